-- The shared product catalog: product sets, products with their reference images, and one embedding per
-- product and model version. Vectors are float32 `vector` without a fixed dimension; each (catalog, version) gets
-- its own partial HNSW index over `embedding::vector(dim)` (services/gateway/catalog/store.py creates it), the
-- pattern pgvector's README gives for indexing vectors of several dimensions in one table.
CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE catalogs (
    catalog_id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name            text NOT NULL UNIQUE,
    -- The embedding model every product of this catalog is embedded with.
    model           text NOT NULL,
    -- The version whose embeddings answer searches ('' until the first product is indexed) and its dimension.
    model_version   text NOT NULL DEFAULT '',
    dim             integer,
    -- While tools.reembed runs: the version being filled in (IndexProduct writes it too) and its dimension.
    reembed_version text NOT NULL DEFAULT '',
    reembed_dim     integer,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Reference images: the platform's own catalog photos, content-addressed (sha256), kept so that re-embedding
-- never needs a re-upload. Query photos of Classify and SearchSimilar are never stored.
CREATE TABLE images (
    sha256     bytea PRIMARY KEY CHECK (length(sha256) = 32),
    image      bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE products (
    catalog_id   bigint NOT NULL REFERENCES catalogs ON DELETE CASCADE,
    product_id   text NOT NULL,
    category     text NOT NULL,
    -- Returned with each match (string -> string).
    metadata     jsonb NOT NULL DEFAULT '{}',
    -- Searchable labels: key -> sorted array of distinct values, e.g. {"color": ["blue", "red"]}.
    attributes   jsonb NOT NULL DEFAULT '{}',
    image_sha256 bytea NOT NULL REFERENCES images,
    image_bytes  integer NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (catalog_id, product_id)
);
CREATE INDEX products_attributes ON products USING gin (attributes jsonb_path_ops);
CREATE INDEX products_category ON products (catalog_id, category);
CREATE INDEX products_image ON products (image_sha256);

CREATE TABLE embeddings (
    catalog_id    bigint NOT NULL,
    product_id    text NOT NULL,
    model_version text NOT NULL,
    embedding     vector NOT NULL,
    -- Denormalised from products so that a filtered ANN scan needs no join to test the category.
    category      text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (catalog_id, product_id, model_version),
    FOREIGN KEY (catalog_id, product_id) REFERENCES products ON DELETE CASCADE
);
