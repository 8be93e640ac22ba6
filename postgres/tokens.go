package postgres

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/pullsecret/pullsecret/proxy"
)

// Tokens keeps project token records (metadata and the SHA-256 of the
// token, never the token) in the table project_tokens. Every Get reads the
// table, so a revocation by any replica is seen by the next one.
type Tokens struct{ db *DB }

var _ proxy.TokenBackend = (*Tokens)(nil)

// Tokens returns the project token backend of db.
func (db *DB) Tokens() *Tokens { return &Tokens{db: db} }

const tokenColumns = "id, project, name, scopes, repositories, created, expires, revoked, ephemeral, sha256"

// Insert implements proxy.TokenBackend.
func (t *Tokens) Insert(ctx context.Context, rec proxy.TokenRecord) error {
	repos := rec.Repositories
	if repos == nil {
		repos = []string{}
	}
	tag, err := t.db.pool.Exec(ctx, `INSERT INTO project_tokens (`+tokenColumns+`)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (id) DO NOTHING`,
		rec.ID, rec.Project, rec.Name, rec.Scopes, repos, rec.Created, rec.Expires, rec.Revoked, rec.Ephemeral, rec.Hash)
	if err != nil {
		return t.db.wrap("insert project token "+rec.ID, err)
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("token %s: %w", rec.ID, proxy.ErrTokenIDTaken)
	}
	return nil
}

// Get implements proxy.TokenBackend.
func (t *Tokens) Get(ctx context.Context, id string) (proxy.TokenRecord, error) {
	rec, err := scanToken(t.db.pool.QueryRow(ctx, "SELECT "+tokenColumns+" FROM project_tokens WHERE id = $1", id))
	if errors.Is(err, pgx.ErrNoRows) {
		return proxy.TokenRecord{}, fmt.Errorf("token %s: %w", id, proxy.ErrTokenNotFound)
	}
	if err != nil {
		return proxy.TokenRecord{}, t.db.wrap("get project token "+id, err)
	}
	return rec, nil
}

// List implements proxy.TokenBackend.
func (t *Tokens) List(ctx context.Context, project string) ([]proxy.TokenInfo, error) {
	rows, _ := t.db.pool.Query(ctx, "SELECT "+tokenColumns+
		" FROM project_tokens WHERE $1 = '' OR project = $1 ORDER BY created, id", project)
	recs, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (proxy.TokenRecord, error) { return scanToken(r) })
	if err != nil {
		return nil, t.db.wrap("list project tokens", err)
	}
	out := make([]proxy.TokenInfo, len(recs))
	for i, r := range recs {
		out[i] = r.TokenInfo
	}
	return out, nil
}

// Revoke implements proxy.TokenBackend: the first revocation's time stays.
func (t *Tokens) Revoke(ctx context.Context, id string, at time.Time) (proxy.TokenInfo, error) {
	rec, err := scanToken(t.db.pool.QueryRow(ctx, `UPDATE project_tokens SET revoked = COALESCE(revoked, $2)
		WHERE id = $1 RETURNING `+tokenColumns, id, at))
	if errors.Is(err, pgx.ErrNoRows) {
		return proxy.TokenInfo{}, fmt.Errorf("token %s: %w", id, proxy.ErrTokenNotFound)
	}
	if err != nil {
		return proxy.TokenInfo{}, t.db.wrap("revoke project token "+id, err)
	}
	return rec.TokenInfo, nil
}

func scanToken(row pgx.Row) (proxy.TokenRecord, error) {
	var r proxy.TokenRecord
	err := row.Scan(&r.ID, &r.Project, &r.Name, &r.Scopes, &r.Repositories, &r.Created, &r.Expires, &r.Revoked, &r.Ephemeral, &r.Hash)
	if err != nil {
		return proxy.TokenRecord{}, err
	}
	r.Created, r.Expires = r.Created.UTC(), r.Expires.UTC()
	if r.Revoked != nil {
		at := r.Revoked.UTC()
		r.Revoked = &at
	}
	if len(r.Repositories) == 0 {
		r.Repositories = nil // as the file keeps "every repository"
	}
	return r, nil
}
