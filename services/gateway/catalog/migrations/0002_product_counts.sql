-- Products per catalog, kept by every write in its own transaction, so that IndexProduct and DeleteProduct can
-- answer the catalog's size without counting it (a count(*) per write grows with the catalog). A table of its
-- own, not a column of `catalogs`: writers hold their catalog row FOR SHARE, and updating a column there would
-- make concurrent writers wait on (and deadlock with) each other's share locks.
CREATE TABLE catalog_counts (
    catalog_id bigint PRIMARY KEY REFERENCES catalogs ON DELETE CASCADE,
    products   bigint NOT NULL DEFAULT 0 CHECK (products >= 0)
);
INSERT INTO catalog_counts (catalog_id, products)
SELECT c.catalog_id, (SELECT count(*) FROM products p WHERE p.catalog_id = c.catalog_id) FROM catalogs c;
