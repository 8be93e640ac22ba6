package postgres

import (
	"context"
	"errors"
	"time"
)

// leaseGrace is how long an expired fill lease row is kept: a filler that
// died leaves its row behind, and a row past its expiry only says who held
// the lease.
const leaseGrace = time.Hour

// Prune deletes the rows that no longer serve: ephemeral project tokens
// past their expiry (the file drops them too), access records older than
// the retention, and fill leases expired for an hour. Every replica may
// run it; the deletes are idempotent.
func (db *DB) Prune(ctx context.Context) error {
	var errs []error
	for _, q := range []struct {
		what string
		sql  string
		args []any
	}{
		{"prune ephemeral tokens", "DELETE FROM project_tokens WHERE ephemeral AND expires <= now()", nil},
		{"prune access records", "DELETE FROM access_records WHERE at < $1", []any{db.now().Add(-db.retain)}},
		{"prune fill leases", "DELETE FROM fill_leases WHERE expires < now() - $1::bigint * interval '1 microsecond'", []any{leaseGrace.Microseconds()}},
	} {
		if _, err := db.pool.Exec(ctx, q.sql, q.args...); err != nil {
			errs = append(errs, db.wrap(q.what, err))
		}
	}
	return errors.Join(errs...)
}

// Maintain runs Prune every interval until ctx ends, logging failures.
func (db *DB) Maintain(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := db.Prune(ctx); err != nil && ctx.Err() == nil {
				db.log.Warn("metadata: pruning failed", "err", err)
			}
		}
	}
}
