"""Where the config document comes from: a file (`proxy/source/file.py`) or an etcd v3 key
(`proxy/source/etcd.py`). The supervisor asks its source for the current text and is told
when there is a new one; it parses and switches the workers the same way whichever it is."""
