-- Seeds posts_post with exactly 1,000,000 posts, once. Idempotent: the row in awaitlab_seed
-- says it was done; a second run changes nothing. One transaction, so an interrupted seed
-- leaves nothing half done. Seeded posts carry created_at = updated_at = the seed mark
-- (2022-01-01 UTC); posts that io_create adds carry now(), which is how reset.sql finds them.
-- Needs the table from `manage.py migrate`.
CREATE TABLE IF NOT EXISTS awaitlab_seed (
    rows bigint NOT NULL,
    mark timestamptz NOT NULL,
    seeded_at timestamptz NOT NULL DEFAULT now()
);
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM awaitlab_seed) THEN
        TRUNCATE posts_post;
        INSERT INTO posts_post (id, title, content, created_at, updated_at)
        SELECT gen_random_uuid(),
               'Post ' || i,
               'Content of post ' || i || ': ' || md5(i::text),
               timestamptz '2022-01-01 00:00:00+00',
               timestamptz '2022-01-01 00:00:00+00'
        FROM generate_series(1, 1000000) AS i;
        INSERT INTO awaitlab_seed (rows, mark) VALUES (1000000, timestamptz '2022-01-01 00:00:00+00');
        RAISE NOTICE 'awaitlab: seeded 1000000 posts';
    END IF;
END
$$;
