package main

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pullsecret/pullsecret/audit"
	"github.com/pullsecret/pullsecret/internal/pgtest"
	"github.com/pullsecret/pullsecret/postgres"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// TestAuditQueriesTheDatabase: with metadata driver postgres, 'pullsecret
// audit --config' (or $PULLSECRET_CONFIG) reads the database's audit table,
// not audit.jsonl.
func TestAuditQueriesTheDatabase(t *testing.T) {
	t.Parallel()
	dsn := pgtest.DSN(t)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	db, err := postgres.Open(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	a := db.OpenAuditLog()
	now := time.Now().UTC().Truncate(time.Second)
	for _, ev := range []audit.Event{
		{Time: now.Add(-2 * time.Minute), Project: "acme", TokenID: "tok1", Action: "pull", Upstream: "ghcr.io", Repository: "acme/app", Reference: "1.0", Decision: audit.Allowed, Secret: "ghcr"},
		{Time: now.Add(-time.Minute), Project: "other", TokenID: "tok2", Action: "pull", Upstream: "ghcr.io", Repository: "other/app", Reference: "2.0", Decision: audit.Allowed},
	} {
		if err := a.Record(ctx, ev); err != nil {
			t.Fatal(err)
		}
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}

	e := newEnv(t)
	dir := t.TempDir()
	dsnFile := filepath.Join(dir, "dsn")
	if err := os.WriteFile(dsnFile, []byte(dsn+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(dir, "serve.yaml")
	if err := os.WriteFile(cfg, []byte("home: "+filepath.Join(dir, "home")+"\nmetadata: {driver: postgres, dsn_file: "+dsnFile+"}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	out := e.must("", "audit", "--config", cfg, "--project", "acme", "-o", "json")
	var got []audit.Event
	dec := json.NewDecoder(strings.NewReader(out))
	for dec.More() {
		var ev audit.Event
		if err := dec.Decode(&ev); err != nil {
			t.Fatalf("%v in %q", err, out)
		}
		got = append(got, ev)
	}
	if len(got) != 1 || got[0].TokenID != "tok1" || got[0].Repository != "acme/app" || got[0].Secret != "ghcr" {
		t.Fatalf("audit --config --project acme: %+v", got)
	}
	e.vars["PULLSECRET_CONFIG"] = cfg
	table := e.must("", "audit")
	for _, want := range []string{"tok1", "ghcr.io/acme/app:1.0", "tok2", "ghcr.io/other/app:2.0"} {
		if !strings.Contains(table, want) {
			t.Errorf("audit with $PULLSECRET_CONFIG: no %q in\n%s", want, table)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "home", audit.FileName)); err == nil {
		t.Error("audit created an audit.jsonl")
	}
}
