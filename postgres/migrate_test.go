package postgres

import (
	"context"
	"slices"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/pullsecret/pullsecret/internal/pgtest"
)

func TestMigrationFiles(t *testing.T) {
	t.Parallel()
	ms, err := loadMigrations()
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) == 0 || latestVersion() != len(ms) {
		t.Fatalf("%d migrations, latest %d", len(ms), latestVersion())
	}
}

// TestMigrateConcurrently: five replicas start at once on an empty
// database, each with its own pool: every migration is applied exactly
// once, by one of them, and all five start.
func TestMigrateConcurrently(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dsn := pgtest.DSN(t)
	const replicas = 5
	pools := make([]*pgxpool.Pool, replicas)
	for i := range pools {
		p, err := pgxpool.New(ctx, dsn)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(p.Close)
		pools[i] = p
	}
	applied := make([][]int, replicas)
	errs := make([]error, replicas)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i, p := range pools {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			applied[i], _, errs[i] = Migrate(ctx, p)
		}()
	}
	close(start)
	wg.Wait()
	var all []int
	for i := range pools {
		if errs[i] != nil {
			t.Fatalf("replica %d: %v", i, errs[i])
		}
		all = append(all, applied[i]...)
	}
	slices.Sort(all)
	want := make([]int, latestVersion())
	for i := range want {
		want[i] = i + 1
	}
	if !slices.Equal(all, want) {
		t.Fatalf("versions applied by the five replicas together: %v, want each of %v once", all, want)
	}
	rows, _ := pools[0].Query(ctx, "SELECT version FROM schema_migrations ORDER BY version")
	versions, err := pgx.CollectRows(rows, pgx.RowTo[int32])
	if err != nil {
		t.Fatal(err)
	}
	if len(versions) != len(want) {
		t.Fatalf("schema_migrations holds %v, want %v", versions, want)
	}
	// A later start finds nothing to do, and the advisory lock was given
	// back (it would block this call otherwise).
	if again, newer, err := Migrate(ctx, pools[3]); err != nil || len(again) != 0 || newer != 0 {
		t.Fatalf("second migration: applied %v, newer %d, %v", again, newer, err)
	}
}

// TestMigrateNewerSchema: a replica of an older version starts on a schema
// a newer one migrated (a rolling upgrade): it works on, and says so.
func TestMigrateNewerSchema(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := open(t, pgtest.DSN(t))
	future := latestVersion() + 7
	if _, err := db.pool.Exec(ctx, "INSERT INTO schema_migrations (version, name) VALUES ($1, 'from_the_future')", future); err != nil {
		t.Fatal(err)
	}
	applied, newer, err := Migrate(ctx, db.pool)
	if err != nil || len(applied) != 0 || newer != future {
		t.Fatalf("Migrate on a newer schema: applied %v, newer %d, %v; want none, %d, nil", applied, newer, err, future)
	}
}
