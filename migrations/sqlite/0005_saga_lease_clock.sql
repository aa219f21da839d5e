-- Deferrals of a saga; see migrations/postgres/0006. Times in
-- saga_instances are the database's clock from here on.
ALTER TABLE saga_instances ADD COLUMN deferrals INTEGER NOT NULL DEFAULT 0;
