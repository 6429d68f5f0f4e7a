# The app image: one image for `billing migrate`, `billing worker`, `billing api`
# and, in development, `billing emulator serve`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY . .
RUN pip install . \
    && useradd --create-home --uid 10001 --user-group billing \
    && mkdir /data \
    && chown billing:billing /data

# Never run as root; `billing` reads its settings from the environment.
USER billing
WORKDIR /home/billing
EXPOSE 8000
CMD ["billing", "api", "--host", "0.0.0.0", "--port", "8000"]
