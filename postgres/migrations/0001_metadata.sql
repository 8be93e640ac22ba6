-- pullsecret metadata, version 1. Migrations only add: a replica of the
-- previous version must keep working on the new schema.

-- Project tokens: only the SHA-256 of a token is stored.
CREATE TABLE project_tokens (
	id           text PRIMARY KEY,
	project      text NOT NULL,
	name         text NOT NULL DEFAULT '',
	scopes       text[] NOT NULL,
	repositories text[] NOT NULL DEFAULT '{}',
	created      timestamptz NOT NULL,
	expires      timestamptz NOT NULL,
	revoked      timestamptz,
	ephemeral    boolean NOT NULL DEFAULT false,
	sha256       bytea NOT NULL CHECK (length(sha256) = 32)
);
CREATE INDEX project_tokens_project_created ON project_tokens (project, created);
CREATE INDEX project_tokens_ephemeral_expires ON project_tokens (expires) WHERE ephemeral;

-- Sealed pull secrets: the record (metadata and ciphertext) as the store
-- writes it, and the registry hosts of its patterns for the lookup of a
-- pull.
CREATE TABLE pull_secrets (
	project text NOT NULL,
	name    text NOT NULL,
	hosts   text[] NOT NULL,
	record  jsonb NOT NULL,
	PRIMARY KEY (project, name)
);
CREATE INDEX pull_secrets_hosts ON pull_secrets USING gin (hosts);

-- Access records: when a project last proved, with its own credential,
-- that an upstream grants it a repository.
CREATE TABLE access_records (
	project  text NOT NULL,
	upstream text NOT NULL,
	repo     text NOT NULL,
	at       timestamptz NOT NULL,
	PRIMARY KEY (project, upstream, repo)
);
CREATE INDEX access_records_at ON access_records (at);

-- Fill leases: which replica fetches a blob from the upstream, where the
-- others reach it, and until when (on the database's clock).
CREATE TABLE fill_leases (
	key     text PRIMARY KEY,
	holder  text NOT NULL,
	addr    text NOT NULL,
	expires timestamptz NOT NULL
);

-- The audit trail: the event as JSON, and the columns queries filter on.
CREATE TABLE audit_events (
	id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	time     timestamptz NOT NULL,
	project  text NOT NULL,
	decision text NOT NULL,
	event    jsonb NOT NULL
);
CREATE INDEX audit_events_time ON audit_events (time);
CREATE INDEX audit_events_project_time ON audit_events (project, time);
CREATE INDEX audit_events_denied_time ON audit_events (time) WHERE decision = 'denied';
