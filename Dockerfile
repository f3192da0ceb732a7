# Gatehouse container image.
#
#   docker build -t gatehouse .
#   export GATEHOUSE_ADMIN_TOKEN=$(openssl rand -hex 32)
#   docker run --rm -p 8080:8080 -p 127.0.0.1:9901:9901 -e GATEHOUSE_ADMIN_TOKEN \
#     -v "$PWD/routes.yaml:/etc/gatehouse/routes.yaml:ro" gatehouse
#
# Ports: 8080 is the proxy listener of the bundled routes.yaml (HTTP/1.1 and h2c), 9901 the
# admin listener (/metrics /healthz /readyz /config, POST /reload). The config is read from
# /etc/gatehouse/routes.yaml: mount your own file there, or mount it elsewhere and pass its
# path as the command (`docker run ... gatehouse /config/routes.yaml --workers 2`).
# SIGTERM (docker stop) drains in-flight requests within shutdown.grace_period and exits 0.
#
# The admin listener binds 0.0.0.0:9901 here (below), so it leaves loopback: every
# container on the same network reaches it. The config you mount should require a token
# for it, from the environment, as the run above passes it:
#
#   admin:
#     bind: "${GATEHOUSE_ADMIN_BIND:-127.0.0.1:9901}"
#     token: "${GATEHOUSE_ADMIN_TOKEN}"   # all but /healthz and /readyz need it
#
# The bundled routes.yaml, a loopback demo, has none (the gateway warns about it at start).

# --- builder: the project and its dependencies in a venv at /opt/gatehouse -------------
FROM python:3.11-slim AS builder

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# A C compiler for the compiled hot path (mypyc, setup.py); the final stage needs none.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/gatehouse
WORKDIR /src

# Dependencies first, from pyproject.toml alone, so that a change to the code does not
# download them again.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      >requirements.txt \
 && /opt/gatehouse/bin/pip install -r requirements.txt

COPY README.md setup.py ./
COPY proxy ./proxy
COPY middleware ./middleware
COPY metrics ./metrics
# The image ships the compiled build: the build fails here if it fell back to pure Python.
RUN /opt/gatehouse/bin/pip install --no-deps . \
 && /opt/gatehouse/bin/gatehouse --version \
 && /opt/gatehouse/bin/gatehouse --version | grep -q "compiled (mypyc"

# --- final: the same base (the venv's python links to it), the venv and the config ------
FROM python:3.11-slim

# A fixed numeric id, so `runAsNonRoot` (Kubernetes) can verify it and mounted files can be
# given to it.
RUN groupadd --system --gid 10001 gatehouse \
 && useradd --system --uid 10001 --gid gatehouse --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin gatehouse

COPY --from=builder /opt/gatehouse /opt/gatehouse
COPY routes.yaml /etc/gatehouse/routes.yaml
# Where `tls.acme.storage` points in docs/tls.md's recipe: the gatehouse user's, so that a
# named volume mounted there starts out writable by it (docker copies the owner).
RUN install -d -o 10001 -g 10001 -m 0700 /var/lib/gatehouse/acme

# routes.yaml binds the admin listener to ${GATEHOUSE_ADMIN_BIND:-127.0.0.1:9901}: inside a
# container it must listen on every interface for Prometheus in another container (publish
# it with -p 127.0.0.1:9901:9901 to keep it off the outside network, and give it
# admin.token: see the top of this file).
ENV PATH=/opt/gatehouse/bin:$PATH \
    GATEHOUSE_ADMIN_BIND=0.0.0.0:9901

USER 10001:10001

# 8080: proxy listener of the bundled routes.yaml; 9901: admin listener.
EXPOSE 8080 9901

# The gateway drains on SIGTERM (docker stop sends it, then SIGKILL after its -t, 10 s by
# default: give `docker stop -t` at least shutdown.grace_period).
STOPSIGNAL SIGTERM

# Slim images have no curl: python's urllib asks the admin listener's /healthz (any answer
# other than 2xx raises, so the check fails). It follows GATEHOUSE_ADMIN_BIND's port.
# /healthz needs no token, and 127.0.0.1 is a Host the admin listener always answers.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request as u; port = os.environ.get('GATEHOUSE_ADMIN_BIND', '').rpartition(':')[2] or '9901'; u.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2)"]

# Exec form: the gateway is PID 1 and receives SIGTERM itself (no shell in between).
ENTRYPOINT ["gatehouse", "run"]
CMD ["/etc/gatehouse/routes.yaml"]
