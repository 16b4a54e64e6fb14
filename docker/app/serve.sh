#!/bin/sh
# Starts the study's server: `manage.py migrate`, then gunicorn with one worker and one thread
# and --timeout 180 (the study's command line). AWL_VIEWS=sync: the sync worker;
# AWL_VIEWS=async: one uvicorn worker (uvicorn_worker.UvicornWorker where installed, the
# deprecated uvicorn.workers.UvicornWorker of the study's uvicorn 0.20 otherwise).
# AWL_BIND (default 0.0.0.0:8000) is where it listens.
set -e
cd "$(dirname "$0")"
python manage.py migrate --noinput
bind="${AWL_BIND:-0.0.0.0:8000}"
if [ "${AWL_VIEWS:-sync}" = async ]; then
    if python -c 'import uvicorn_worker' 2>/dev/null; then
        worker=uvicorn_worker.UvicornWorker
    else
        worker=uvicorn.workers.UvicornWorker
    fi
    exec gunicorn studysite.asgi:application -k "$worker" --workers 1 --threads 1 --timeout 180 --bind "$bind"
fi
exec gunicorn studysite.wsgi:application --workers 1 --threads 1 --timeout 180 --bind "$bind"
