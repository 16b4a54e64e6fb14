"""Settings of the study's system under test, driven by environment variables.

AWL_SETTINGS     study | production (default). `study`: the study's Django settings: DEBUG on,
                 Django's default middleware minus CSRF (with the apps it needs), the root logger
                 at DEBUG to the console (every SQL statement is printed). `production`: DEBUG
                 off, one middleware, errors only. The agent sets it from the stack (study ->
                 study, current -> production).
AWL_VIEWS        sync | async   which views the URLs route to (the server kind decides it)
AWL_DB_HOST      PostgreSQL host (default: db)
AWL_DB_PORT      PostgreSQL port (default: 5432)
AWL_DB_NAME      database (default: study)
AWL_DB_USER      role (default: postgres, a superuser as in the study's postgres image)
AWL_DB_PASSWORD  its password (PostgreSQL asks for it with SCRAM-SHA-256, as in the study)
AWL_DB_POOL      pool size; 0 (default) = no pool. Needs Django >= 5.1 with psycopg 3 (async-pooled).

As in the study: CONN_MAX_AGE = 0 (a new database connection per request).
"""
import os

PROFILE = os.environ.get("AWL_SETTINGS", "production")
if PROFILE not in ("study", "production"):
    raise RuntimeError(f"AWL_SETTINGS must be study or production, not {PROFILE!r}")
STUDY = PROFILE == "study"

SECRET_KEY = "awaitlab-study-not-secret"
# The study ran with DEBUG on: Django then keeps every query of a request in memory and logs it.
DEBUG = STUDY
ALLOWED_HOSTS = ["*"]
USE_TZ = True
TIME_ZONE = "UTC"

if STUDY:
    # Django's default middleware minus CsrfViewMiddleware, as the study ran it. None of them
    # touches the database on the study's routes (no session is read or saved, request.user is
    # lazy), but each one runs on every request.
    INSTALLED_APPS = [
        "django.contrib.auth",
        "django.contrib.contenttypes",
        "django.contrib.sessions",
        "django.contrib.messages",
        "posts",
    ]
    MIDDLEWARE = [
        "django.middleware.security.SecurityMiddleware",
        "django.contrib.sessions.middleware.SessionMiddleware",
        "django.middleware.common.CommonMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
        "django.contrib.messages.middleware.MessageMiddleware",
        "django.middleware.clickjacking.XFrameOptionsMiddleware",
    ]
else:
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
        "PASSWORD": os.environ.get("AWL_DB_PASSWORD", ""),
        "CONN_MAX_AGE": 0,
        "OPTIONS": _options,
    }
}

if STUDY:
    # The study's logging: everything at DEBUG to the console, which with DEBUG on includes
    # every SQL statement (django.db.backends). Django's own default configuration holds its
    # loggers at INFO with a console handler of their own: here they log at DEBUG through the
    # root's handler, so each line is printed once. The back ends bound what this writes: the
    # netns back end starts a fresh log file with every server, the docker one rotates the
    # container's.
    LOGGING = {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {"console": {"class": "logging.StreamHandler"}},
        "root": {"handlers": ["console"], "level": "DEBUG"},
        "loggers": {"django": {"level": "DEBUG"}},
    }
else:
    # With DEBUG off Django would mail server errors to nobody; print them instead, so that an
    # HTTP 500 (e.g. PostgreSQL's "too many clients") shows its cause in the server's log.
    LOGGING = {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {"console": {"class": "logging.StreamHandler"}},
        "loggers": {"django.request": {"handlers": ["console"], "level": "ERROR", "propagate": False}},
    }
