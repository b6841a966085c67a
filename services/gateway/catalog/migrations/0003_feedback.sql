-- Feedback (SubmitFeedback): a caller's photo with the label it should have had, kept to retrain the model
-- (python -m training.feedback export). The one place where a caller's photo is stored, because the caller sends
-- it for that purpose. Photos live in the content-addressed `images` table of 0001: the same bytes are kept once,
-- whether they are a catalog reference image, feedback, or both, and the foreign key keeps the catalog's orphan
-- clean-up (which deletes an image no product uses) from removing a photo that feedback still needs.
CREATE TABLE feedback (
    -- uuidv7 (PostgreSQL 18): unguessable across deployments, yet time-ordered, so inserts append to the index.
    feedback_id  uuid PRIMARY KEY DEFAULT uuidv7(),
    -- The public model name the label belongs to (the default model resolved), e.g. 'fashion_cnn'.
    model        text NOT NULL,
    label        text NOT NULL,
    image_sha256 bytea NOT NULL REFERENCES images,
    image_bytes  integer NOT NULL,
    -- Optional context from the caller: the Classify answer being corrected, the catalog product shown.
    request_id   text NOT NULL DEFAULT '',
    product_id   text NOT NULL DEFAULT '',
    -- Who sent it, as far as the gateway knows (x-caller-id metadata or the client certificate's name); '' if not.
    caller       text NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- The same photo with the same label for the same model is kept once (SubmitFeedback answers duplicate).
    CONSTRAINT feedback_once UNIQUE (model, image_sha256, label)
);
-- The export reads one model's feedback in time order, optionally from a point in time (--since).
CREATE INDEX feedback_export ON feedback (model, created_at);
CREATE INDEX feedback_image ON feedback (image_sha256);
