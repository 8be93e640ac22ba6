package postgres

import (
	"context"
	"embed"
	"fmt"
	"io/fs"
	"path"
	"regexp"
	"slices"
	"strconv"
	"sync"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

//go:embed migrations/*.sql
var migrationFiles embed.FS

// migration is one schema version: migrations/NNNN_name.sql.
type migration struct {
	version int
	name    string
	sql     string
}

var migrationName = regexp.MustCompile(`^(\d{4})_([a-z0-9_]+)\.sql$`)

// loadMigrations reads the embedded migrations, which must be numbered 1,
// 2, 3, ... without gaps.
var loadMigrations = sync.OnceValues(func() ([]migration, error) {
	entries, err := fs.ReadDir(migrationFiles, "migrations")
	if err != nil {
		return nil, err
	}
	var out []migration
	for _, e := range entries {
		m := migrationName.FindStringSubmatch(e.Name())
		if m == nil {
			return nil, fmt.Errorf("migration %s: want NNNN_name.sql", e.Name())
		}
		b, err := migrationFiles.ReadFile(path.Join("migrations", e.Name()))
		if err != nil {
			return nil, err
		}
		v, _ := strconv.Atoi(m[1])
		out = append(out, migration{version: v, name: m[2], sql: string(b)})
	}
	slices.SortFunc(out, func(a, b migration) int { return a.version - b.version })
	for i, m := range out {
		if m.version != i+1 {
			return nil, fmt.Errorf("migration %04d_%s: want version %d (no gaps, no repeats)", m.version, m.name, i+1)
		}
	}
	return out, nil
})

// latestVersion is the newest schema version this binary knows.
func latestVersion() int {
	ms, _ := loadMigrations()
	return len(ms)
}

// migrateLock is the advisory lock key that serialises migrations: the
// ASCII of "pullmigr".
const migrateLock int64 = 0x70756c6c6d696772

// Migrate brings the schema of the pool's database up to this binary's
// version and returns the versions it applied. Replicas may call it at
// once: a session advisory lock makes each wait for the one migrating,
// after which it finds nothing left to do. Each version is applied in a
// transaction with its schema_migrations row, so a crash leaves it either
// applied or not. newer is the database's version when it is ahead of this
// binary (0 otherwise): a replica of the previous version during a rolling
// upgrade, which works on since migrations only add.
func Migrate(ctx context.Context, pool *pgxpool.Pool) (applied []int, newer int, err error) {
	ms, err := loadMigrations()
	if err != nil {
		return nil, 0, err
	}
	conn, err := pool.Acquire(ctx)
	if err != nil {
		return nil, 0, err
	}
	defer conn.Release()
	if _, err := conn.Exec(ctx, "SELECT pg_advisory_lock($1)", migrateLock); err != nil {
		return nil, 0, fmt.Errorf("take the migration lock: %w", err)
	}
	defer func() {
		// A session lock outlives a failed unlock: close the connection
		// rather than hand it back holding the lock.
		if _, uerr := conn.Exec(context.WithoutCancel(ctx), "SELECT pg_advisory_unlock($1)", migrateLock); uerr != nil {
			conn.Conn().Close(context.WithoutCancel(ctx))
		}
	}()
	// Created under the lock: two concurrent CREATE TABLE IF NOT EXISTS
	// can both try to create it, and one fails.
	if _, err := conn.Exec(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (
		version    integer PRIMARY KEY,
		name       text NOT NULL,
		applied_at timestamptz NOT NULL DEFAULT now())`); err != nil {
		return nil, 0, fmt.Errorf("create schema_migrations: %w", err)
	}
	rows, _ := conn.Query(ctx, "SELECT version FROM schema_migrations")
	have, err := pgx.CollectRows(rows, pgx.RowTo[int32])
	if err != nil {
		return nil, 0, fmt.Errorf("read schema_migrations: %w", err)
	}
	for _, v := range have {
		if int(v) > len(ms) && int(v) > newer {
			newer = int(v)
		}
	}
	for _, m := range ms {
		if slices.Contains(have, int32(m.version)) {
			continue
		}
		err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			// No arguments: the simple protocol, which runs a file of
			// several statements.
			if _, err := tx.Exec(ctx, m.sql); err != nil {
				return err
			}
			_, err := tx.Exec(ctx, "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", m.version, m.name)
			return err
		})
		if err != nil {
			return applied, newer, fmt.Errorf("apply migration %04d_%s: %w", m.version, m.name, err)
		}
		applied = append(applied, m.version)
	}
	return applied, newer, nil
}
