"""`manage.py system_record`: prints, as one JSON object, what this server runs with, measured
rather than assumed: versions from the installed packages, the settings Django loaded, and, over
the server's own kind of database connection, what PostgreSQL reports (its version, limits, and
how that connection authenticated). The agent runs it in the server's environment after every
start and stores the result with each cell; the report compares it with the study's.

It only reads: no row is written, nothing is migrated.
"""
import json
import logging
import platform
from importlib import metadata

import django
from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import connection

# The pg_hba.conf rule PostgreSQL applies to this connection: the first `host` rule whose
# database, role and address match (pg_hba_file_rules lists the file in order; superuser only).
# The nested CASEs keep the inet casts away from keyword addresses and mixed address families.
HBA_RULE = """
SELECT line_number, auth_method FROM pg_hba_file_rules
WHERE type IN ('host', 'hostnossl') AND error IS NULL
  AND database && ARRAY['all', current_database()::text]
  AND user_name && ARRAY['all', current_user::text]
  AND CASE
        WHEN address = 'all' THEN true
        WHEN address ~ '^[0-9a-fA-F.:]+$' AND netmask IS NOT NULL THEN
          CASE WHEN family(address::inet) = family(inet_client_addr())
               THEN (inet_client_addr() & netmask::inet) = (address::inet & netmask::inet)
               ELSE false END
        ELSE false
      END
ORDER BY line_number LIMIT 1
"""


def version(dist):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def one(cursor, sql):
    cursor.execute(sql)
    row = cursor.fetchone()
    return row[0] if row else None


class Command(BaseCommand):
    help = "Print the server's configuration and its database connection's, as JSON."
    requires_system_checks = []

    def handle(self, *args, **options):
        db = settings.DATABASES["default"]
        with connection.cursor() as c:
            hba = None
            c.execute(HBA_RULE)
            row = c.fetchone()
            if row:
                hba = {"line": row[0], "method": row[1]}
            record = {
                "postgres_version": one(c, "SHOW server_version"),
                "max_connections": int(one(c, "SHOW max_connections")),
                "password_encryption": one(c, "SHOW password_encryption"),
                "db_auth_rule": hba,
                "db_password_stored_as": one(
                    c,
                    "SELECT split_part(rolpassword, '$', 1) FROM pg_authid WHERE rolname = current_user",
                ),
                "db_ssl": bool(one(c, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")),
            }
        raw = connection.connection
        # libpq's PQconnectionUsedPassword: whether the server asked this connection for the
        # password (psycopg2 exposes it on .info, psycopg 3 on .pgconn).
        pgconn = getattr(raw, "pgconn", None)
        used = getattr(raw.info, "used_password", None)
        if used is None and pgconn is not None:
            used = pgconn.used_password
        driver = connection.Database
        root = logging.getLogger()
        record.update(
            {
                "python": platform.python_version(),
                "django": django.get_version(),
                "db_driver": f"{driver.__name__} {driver.__version__.split()[0]}",
                "gunicorn": version("gunicorn"),
                "uvicorn": version("uvicorn"),
                "debug": bool(settings.DEBUG),
                "middleware": list(settings.MIDDLEWARE),
                "installed_apps": list(settings.INSTALLED_APPS),
                "conn_max_age": db.get("CONN_MAX_AGE"),
                "db_pool": bool(db.get("OPTIONS", {}).get("pool")),
                "root_log_level": logging.getLevelName(root.getEffectiveLevel()),
                # Django logs each statement at DEBUG on django.db.backends, and only with DEBUG on.
                "sql_logged": bool(settings.DEBUG)
                and logging.getLogger("django.db.backends").isEnabledFor(logging.DEBUG),
                "db_used_password": None if used is None else bool(used),
            }
        )
        self.stdout.write(json.dumps(record))
