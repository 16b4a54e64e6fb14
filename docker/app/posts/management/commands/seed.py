"""`manage.py seed`: runs sql/seed.sql (1,000,000 posts, once) for compose users; the agent
runs the same file through psql."""
from pathlib import Path

from django.core.management.base import BaseCommand
from django.db import connection

SQL = Path(__file__).resolve().parents[3] / "sql"


class Command(BaseCommand):
    help = "Seed 1,000,000 posts once (idempotent), then VACUUM ANALYZE."

    def handle(self, *args, **options):
        with connection.cursor() as c:
            c.execute("SELECT to_regclass('awaitlab_seed') IS NOT NULL")
            has_table = c.fetchone()[0]
            done = False
            if has_table:
                c.execute("SELECT EXISTS (SELECT 1 FROM awaitlab_seed)")
                done = c.fetchone()[0]
            if done:
                self.stdout.write("already seeded")
                return
            c.execute((SQL / "seed.sql").read_text())
        # VACUUM cannot run inside a transaction; Django's default is autocommit.
        with connection.cursor() as c:
            c.execute("VACUUM ANALYZE posts_post")
        self.stdout.write("seeded 1000000 posts")
