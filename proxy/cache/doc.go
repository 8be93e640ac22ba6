// Package cache is the proxy's content cache: blobs and manifests keyed by
// digest, a tag index keyed by upstream host, repository and tag, and
// content locations, all on a distribution storage driver (the filesystem
// under $PULLSECRET_HOME/cache by default; s3-aws, gcs, azure for replicas
// sharing one store), plus the access records of tenant isolation.
//
// # Coalesced streaming fill
//
// The first request for an uncached blob starts one upstream fetch (the
// caller's FetchFunc, called once per digest at a time) into a local spool
// file. Every concurrent request for the digest — whatever its project,
// once the caller has checked that project may have it — reads the spool
// while it fills, each at its own offset (Seek, ReadAt: Range requests),
// waiting on a channel when it is ahead of the fill. The first reader gets
// each chunk as soon as it is written to the spool (a copy into the page
// cache and one out). The upstream sends the blob once, however many
// clients want it.
//
// The fill runs on its own context, bounded by WithFillTimeout: a client
// that disconnects does not stop it for the others, and if every client
// leaves it still finishes and commits (so a warm-up may walk away). The
// digest is computed while writing; the last byte is released to readers
// only once it matches, so no reader ever sees the whole of unverified
// content. A mismatch, a short or long body or the deadline fails every
// reader (Read returns a *FillError, even after earlier bytes), nothing is
// cached, and the next request starts a fresh fill.
//
// Manifests (Manifest, at most 4 MiB) are coalesced the same way but
// buffered in memory, and hashed both when fetched and when read back.
//
// # Commit and crash safety
//
// A verified spool becomes a cache entry atomically: with OpenFilesystem
// the spool lives under the driver's root and is fsynced and renamed into
// place (driver.Move); on s3-aws it is uploaded to the final path as a
// multipart upload, which is no object until Commit completes it whole;
// with another driver it is written to /_uploads/<instance>/<random>/data
// (driver.Writer, Commit) and moved into place. The bytes uploaded are
// hashed again and must match the digest before Commit. Readers only ever
// read final paths. A process killed at any point leaves at most a spool
// file and an upload directory (on s3-aws: an incomplete multipart upload),
// which no reader looks at; the next Open removes them: each instance holds
// an flock on its spool directory, so a directory whose lock is free
// belonged to a dead process (uploads of unknown instances go after
// WithUploadGrace). Incomplete multipart uploads are the bucket's
// lifecycle rule's to abort.
//
// # Locations and tenant isolation
//
// A cache shared by projects must not turn "knows a digest" into "may
// read it" (DESIGN.md invariant 2). Two facts are needed before serving
// cached content of upstream U, repository R, to project P:
//
//  1. P's own credential was accepted by U for R within access_ttl — an
//     access record (AccessRecords, kept by the proxy);
//  2. the digest is in U/R — a location, kept by the cache: recorded when
//     content is fetched through R, when a manifest fetched through R (or
//     a tag of R) references it, or when U answered a HEAD for it in R.
//
// The In option makes the cache enforce (2) on every Blob, Manifest and
// Stat call, including joins of fills in flight from another repository,
// calling the caller's check (a HEAD with P's credential) when the location
// is not known yet. The proxy enforces (1) before calling the cache:
//
//	// once per request, before the cache, for project P, upstream U, repo R
//	ok, _ := records.Valid(ctx, AccessKey{P, U, R}, accessTTL)
//	if !ok {
//		// prove it: HEAD /v2/R/manifests/<ref> (or a token grant for R)
//		// with P's own credential
//		switch {
//		case err == nil:          records.Record(ctx, key, now)
//		case status 401 or 403:   records.Revoke(ctx, key); deny (DENIED)
//		case upstream down and a previous record exists: serve (policy)
//		default:                  deny
//		}
//	}
//	// tags
//	desc, stale, err := c.ResolveTag(ctx, TagKey{U, R, tag}, tagTTL, headWithPsCredential, Project(P))
//	// manifests and blobs
//	m, err := c.Manifest(ctx, d, getWithPsCredential, In(U, R, headWithPsCredential), Project(P))
//	r, err := c.Blob(ctx, d, getWithPsCredential, In(U, R, headWithPsCredential), Project(P))
//
// # Tags
//
// ResolveTag returns a cached tag younger than its TTL (tag_ttl, 1m),
// otherwise revalidates it with the caller's function; an error wrapping
// ErrUpstreamUnavailable (unreachable, 5xx, 429) serves the cached entry
// as stale, any other error (401, 403) never does.
//
// # Retention
//
// GC deletes least recently used entries first (last use: the newest of
// the commit time, an "accessed" sidecar written at most once per
// WithAccessResolution, and this process's in-memory record), never one a
// fill or reader of this process uses, never one referenced by a manifest
// that stays; a deletion takes the data off its final path (a move, or
// on s3-aws the deletion of that one object) before deleting the rest.
//
// # Storage layout
//
// See the constants in cache.go. Every path matches the driver path
// grammar; upstream hosts are escaped into one path component.
package cache
