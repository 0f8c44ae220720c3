# hotsup in a container: one supervisor per pod, serving the bundles baked
# into the image. An upgrade across pods is the orchestrator's rolling update
# of a new image, gated by /readyz (contrib/kubernetes/deployment.yaml).
#   docker build -t hotsup . && docker run -p 8101-8103:8101-8103 -p 9100:9100 hotsup
# tests/test_contrib.py checks this file's steps without Docker.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# hotsup itself, installed from this repository.
COPY pyproject.toml README.md /opt/hotsup/
COPY supervisor /opt/hotsup/supervisor
COPY worker /opt/hotsup/worker
# A numeric uid, so Kubernetes' runAsNonRoot can check it.
RUN pip install /opt/hotsup \
    && groupadd --system --gid 10001 hotsup \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /srv/hotsup \
       --shell /usr/sbin/nologin hotsup

# The service: its config and its bundles (read-only to the hotsup user;
# run_dir, "state", is created by hotsup in the user's home).
WORKDIR /srv/hotsup
COPY contrib/container/config.toml config.toml
COPY bundles bundles
RUN hotsup check config.toml

USER 10001:10001
EXPOSE 8101 8102 8103 9100
# SIGTERM drains every bundle and exits 0 (docker stop's default signal).
STOPSIGNAL SIGTERM
CMD ["hotsup", "start", "/srv/hotsup/config.toml"]
