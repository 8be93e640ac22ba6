package postgres

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/pullsecret/pullsecret/proxy/cache"
)

// Leases keeps fill leases in the table fill_leases, one row per key, on
// the database's clock so that replicas' clocks need not agree. Taking a
// lease is one INSERT ... ON CONFLICT DO UPDATE ... WHERE expired or its
// own: PostgreSQL locks the row for it, so of any number of replicas
// racing for a free or expired lease exactly one gets it.
type Leases struct{ db *DB }

var _ cache.Leases = (*Leases)(nil)

// Leases returns the fill lease table of db.
func (db *DB) Leases() *Leases { return &Leases{db: db} }

// Acquire implements cache.Leases.
func (l *Leases) Acquire(ctx context.Context, key, holder, addr string, ttl time.Duration) (cache.Lease, bool, error) {
	// A lease released between the two statements below leaves nothing to
	// report: try again (a few times; each round trip is a new chance).
	for range 5 {
		cur := cache.Lease{Key: key}
		err := l.db.pool.QueryRow(ctx, `INSERT INTO fill_leases AS l (key, holder, addr, expires)
			VALUES ($1, $2, $3, now() + $4::bigint * interval '1 microsecond')
			ON CONFLICT (key) DO UPDATE SET holder = EXCLUDED.holder, addr = EXCLUDED.addr, expires = EXCLUDED.expires
			WHERE l.expires <= now() OR l.holder = EXCLUDED.holder
			RETURNING holder, addr, expires`, key, holder, addr, ttl.Microseconds()).Scan(&cur.Holder, &cur.Addr, &cur.Expires)
		if err == nil {
			cur.Expires = cur.Expires.UTC()
			return cur, true, nil
		}
		if !errors.Is(err, pgx.ErrNoRows) {
			return cache.Lease{}, false, l.db.wrap("acquire fill lease "+key, err)
		}
		// Held by another, and live: say by whom.
		err = l.db.pool.QueryRow(ctx, "SELECT holder, addr, expires FROM fill_leases WHERE key = $1", key).
			Scan(&cur.Holder, &cur.Addr, &cur.Expires)
		if err == nil {
			cur.Expires = cur.Expires.UTC()
			return cur, false, nil
		}
		if !errors.Is(err, pgx.ErrNoRows) {
			return cache.Lease{}, false, l.db.wrap("read fill lease "+key, err)
		}
	}
	return cache.Lease{}, false, fmt.Errorf("acquire fill lease %s: taken and released five times in a row", key)
}

// Renew implements cache.Leases: the holder extends its lease, even past
// its expiry as long as nobody took it over.
func (l *Leases) Renew(ctx context.Context, key, holder string, ttl time.Duration) error {
	tag, err := l.db.pool.Exec(ctx, `UPDATE fill_leases SET expires = now() + $3::bigint * interval '1 microsecond'
		WHERE key = $1 AND holder = $2`, key, holder, ttl.Microseconds())
	if err != nil {
		return l.db.wrap("renew fill lease "+key, err)
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("fill lease %s: %w", key, cache.ErrLeaseLost)
	}
	return nil
}

// Release implements cache.Leases.
func (l *Leases) Release(ctx context.Context, key, holder string) error {
	_, err := l.db.pool.Exec(ctx, "DELETE FROM fill_leases WHERE key = $1 AND holder = $2", key, holder)
	return l.db.wrap("release fill lease "+key, err)
}
