package postgres

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/pullsecret/pullsecret/proxy/cache"
)

// AccessRecords keeps the access records of tenant isolation in the table
// access_records. Every call reads or writes the table: a record revoked
// by one replica (the upstream refused the project's credential) is gone
// for every replica at once. Record writes through, unlike the file's
// write-behind, since the row is all there is.
type AccessRecords struct{ db *DB }

var _ cache.AccessRecords = (*AccessRecords)(nil)

// AccessRecords returns the access records of db.
func (db *DB) AccessRecords() *AccessRecords { return &AccessRecords{db: db} }

// normUpstream folds the case of an upstream host, as cache.AccessKey
// compares them.
func normUpstream(h string) string { return strings.ToLower(h) }

// Record implements cache.AccessRecords: a record only moves forward.
func (a *AccessRecords) Record(ctx context.Context, k cache.AccessKey, at time.Time) error {
	if k.Project == "" || k.Upstream == "" || k.Repo == "" {
		return fmt.Errorf("%w: access record needs a project, an upstream and a repository", cache.ErrInvalidName)
	}
	_, err := a.db.pool.Exec(ctx, `INSERT INTO access_records AS r (project, upstream, repo, at) VALUES ($1, $2, $3, $4)
		ON CONFLICT (project, upstream, repo) DO UPDATE SET at = GREATEST(r.at, EXCLUDED.at)`,
		k.Project, normUpstream(k.Upstream), k.Repo, at)
	return a.db.wrap("record access", err)
}

// Valid implements cache.AccessRecords, on the replica's clock (the one
// the records were stamped with).
func (a *AccessRecords) Valid(ctx context.Context, k cache.AccessKey, ttl time.Duration) (bool, error) {
	at, ok, err := a.Last(ctx, k)
	if err != nil || !ok || ttl <= 0 {
		return false, err
	}
	return a.db.now().Sub(at) < ttl, nil
}

// Last implements cache.AccessRecords.
func (a *AccessRecords) Last(ctx context.Context, k cache.AccessKey) (time.Time, bool, error) {
	var at time.Time
	err := a.db.pool.QueryRow(ctx, "SELECT at FROM access_records WHERE project = $1 AND upstream = $2 AND repo = $3",
		k.Project, normUpstream(k.Upstream), k.Repo).Scan(&at)
	if errors.Is(err, pgx.ErrNoRows) {
		return time.Time{}, false, nil
	}
	if err != nil {
		return time.Time{}, false, a.db.wrap("read access record", err)
	}
	return at.UTC(), true, nil
}

// Revoke implements cache.AccessRecords.
func (a *AccessRecords) Revoke(ctx context.Context, k cache.AccessKey) error {
	_, err := a.db.pool.Exec(ctx, "DELETE FROM access_records WHERE project = $1 AND upstream = $2 AND repo = $3",
		k.Project, normUpstream(k.Upstream), k.Repo)
	return a.db.wrap("revoke access record", err)
}
