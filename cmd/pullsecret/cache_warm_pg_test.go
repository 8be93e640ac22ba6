package main

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/pullsecret/pullsecret/internal/pgtest"
)

// TestCacheWarmPostgres: with metadata driver postgres, 'cache warm'
// reads the secrets from the database and writes the access records it
// proved there, not to access.json.
func TestCacheWarmPostgres(t *testing.T) {
	t.Parallel()
	dsn := pgtest.DSN(t)
	f := newWarmFixture(t)
	e := newEnv(t)
	dir := t.TempDir()
	dsnFile := filepath.Join(dir, "dsn")
	if err := os.WriteFile(dsnFile, []byte(dsn+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfgFile := filepath.Join(dir, "serve.yaml")
	body := "allow_private_upstreams: [127.0.0.1]\naliases: {up: " + f.up.Host() + "}\nmetadata: {driver: postgres, dsn_file: " + dsnFile + "}\n"
	if err := os.WriteFile(cfgFile, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	e.must(canary, "secret", "create", "up", "--project", "acme", "--registry", f.up.Host(), "--username", "bot", "--password-stdin", "--config", cfgFile)
	e.must("", "cache", "warm", "--project", "acme", "--config", cfgFile, f.ref("v1"))
	if _, err := os.Stat(filepath.Join(e.home, "access.json")); err == nil {
		t.Error("warm wrote access.json with metadata driver postgres")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var n int
	if err := conn.QueryRow(ctx, "SELECT count(*) FROM access_records WHERE project = 'acme'").Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n == 0 {
		t.Error("no access record for acme in the database")
	}
}
