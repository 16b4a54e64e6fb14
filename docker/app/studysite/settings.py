"""Settings of the study's system under test, driven by environment variables.

AWL_VIEWS     sync | async   which views the URLs route to (the server kind decides it)
AWL_DB_HOST   PostgreSQL host (default: db)
AWL_DB_PORT   PostgreSQL port (default: 5432)
AWL_DB_NAME   database (default: study)
AWL_DB_USER   role (default: postgres, a superuser as in the study's postgres image)
AWL_DB_POOL   pool size; 0 (default) = no pool. Needs Django >= 5.1 with psycopg 3 (async-pooled).

As in the study: CONN_MAX_AGE = 0 (a new database connection per request). Unlike the study,
DEBUG is off (the study ran with DEBUG on; DEBUG keeps every query in memory per request).
"""
import os

SECRET_KEY = "awaitlab-study-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
TIME_ZONE = "UTC"

INSTALLED_APPS = ["posts"]
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
ROOT_URLCONF = "studysite.urls"
WSGI_APPLICATION = "studysite.wsgi.application"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

VIEWS = os.environ.get("AWL_VIEWS", "sync")
if VIEWS not in ("sync", "async"):
    raise RuntimeError(f"AWL_VIEWS must be sync or async, not {VIEWS!r}")

_pool = int(os.environ.get("AWL_DB_POOL", "0"))
_options = {}
if _pool > 0:
    # Django's psycopg 3 pool: connections are borrowed per request and given back, so
    # CONN_MAX_AGE stays 0 (Django refuses persistent connections with a pool).
    _options["pool"] = {"min_size": min(4, _pool), "max_size": _pool, "timeout": 60}

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": os.environ.get("AWL_DB_HOST", "db"),
        "PORT": os.environ.get("AWL_DB_PORT", "5432"),
        "NAME": os.environ.get("AWL_DB_NAME", "study"),
        "USER": os.environ.get("AWL_DB_USER", "postgres"),
        "PASSWORD": "",
        "CONN_MAX_AGE": 0,
        "OPTIONS": _options,
    }
}

# With DEBUG off Django would mail server errors to nobody; print them instead, so that an
# HTTP 500 (e.g. PostgreSQL's "too many clients") shows its cause in the server's log.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"django.request": {"handlers": ["console"], "level": "ERROR", "propagate": False}},
}
