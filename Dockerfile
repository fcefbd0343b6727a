# One image per service, built from this file with --build-arg SERVICE=person|score|notifier.
# Slim, pinned, non-root; every process of the service runs from the same image.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 app && useradd --system --uid 10001 --gid app app
WORKDIR /app

# requirements.lock is requirements.txt (and the build backend) with every file's hash (make lock):
# pip refuses a file whose hash it does not list, and a dependency the lock does not pin.
COPY requirements.lock ./
RUN pip install --require-hashes -r requirements.lock

# Declared after the requirements, so the four service images share the layers above.
ARG SERVICE

COPY shared/servicekit ./shared/servicekit
COPY shared/messaging ./shared/messaging
COPY services/${SERVICE} ./services/${SERVICE}
# Built with the hashed setuptools above, not one fetched unchecked for an isolated build.
RUN pip install --no-deps --no-build-isolation ./shared/servicekit ./shared/messaging ./services/${SERVICE} \
    && cp services/${SERVICE}/gunicorn.conf.py /app/gunicorn.conf.py

USER app:app
