"""Automatic certificates from an ACME server (RFC 8555): storage, scheduling, the order
flow and the supervisor's manager. The workers' side (answering challenges, serving what
was obtained) is in proxy/process/acme_serving.py, proxy/exchange/acme_http01.py and
proxy/frontend/client_hello.py."""
