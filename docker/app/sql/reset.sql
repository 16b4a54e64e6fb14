-- Puts posts_post back to exactly the seeded 1,000,000 posts: deletes every post created after
-- the seed mark (io_create's), then fails loudly if the count is not what was seeded.
-- The caller runs VACUUM ANALYZE posts_post afterwards when rows were deleted.
DELETE FROM posts_post WHERE created_at <> (SELECT mark FROM awaitlab_seed);
DO $$
DECLARE n bigint;
BEGIN
    SELECT count(*) INTO n FROM posts_post;
    IF n <> (SELECT rows FROM awaitlab_seed) THEN
        RAISE EXCEPTION 'awaitlab: % posts after reset, expected %', n, (SELECT rows FROM awaitlab_seed);
    END IF;
END
$$;
