// Package postgres keeps pullsecret's metadata in PostgreSQL, so that
// server replicas share it: project token hashes and their revocations
// (proxy.TokenBackend), the sealed pull-secret records (secret.Backend),
// the access records of tenant isolation (cache.AccessRecords), the fill
// leases that make replicas fetch a blob from the upstream once between
// them (cache.Leases), and the audit trail (audit.Log).
//
// Each is the same interface the embedded files implement, and passes the
// same contract tests (secrettest, proxytest, cachetest). What a replica
// writes, every replica reads at its next call: a token revoked through
// one replica is refused by all at their next request, a secret rotated
// through one is what all send upstream next. Nothing is cached in a
// replica's memory.
//
// # Not here: the tag cache
//
// Cached tags (upstream, repository, tag -> digest) stay where the content
// cache keeps them, in its storage driver (/repos/<host>/<repo>/_tags/<tag>
// in package cache). A tag entry is only useful beside the manifest it
// names, replicas that share content share the driver and so the tags with
// it, and a lost or stale entry costs one HEAD upstream, never a wrong
// answer: ResolveTag revalidates it with the asking project's own
// credential when it is older than tag_ttl. A table would add a second
// copy to keep in step with the driver (and with its GC) for nothing.
//
// # Schema
//
// The schema is created and upgraded by Open: versioned SQL files embedded
// in the binary (migrations/NNNN_name.sql), applied in order, each in a
// transaction with its row in schema_migrations, under a PostgreSQL
// advisory lock, so that replicas starting at once apply each exactly once
// and the others wait for it. Migrations only ever add, so that a replica
// of the previous version keeps working during a rolling upgrade.
//
// # Credentials
//
// The sealed records are ciphertext: the database never holds the key,
// which stays a file (PULLSECRET_KEY_FILE) mounted on every replica. No
// error or log line of this package holds the password of the DSN.
package postgres
