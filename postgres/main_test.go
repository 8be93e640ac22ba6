package postgres

import (
	"context"
	"testing"

	"github.com/pullsecret/pullsecret/internal/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// open opens a handle on dsn, closed at cleanup.
func open(t *testing.T, dsn string, opts ...Option) *DB {
	t.Helper()
	db, err := Open(context.Background(), dsn, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(db.Close)
	return db
}

// handles opens n handles (n pools, as n replicas) on one fresh database.
func handles(t *testing.T, n int, opts ...Option) []*DB {
	t.Helper()
	dsn := pgtest.DSN(t)
	out := make([]*DB, n)
	for i := range out {
		out[i] = open(t, dsn, opts...)
	}
	return out
}

func pgtestPassword(t *testing.T) string { return pgtest.Shared(t).Password }
