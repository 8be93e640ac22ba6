package postgres

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pullsecret/pullsecret/proxy"
	"github.com/pullsecret/pullsecret/proxy/cache"
	"github.com/pullsecret/pullsecret/secret"
)

const canary = "canary-pg-value-93be1f"

// TestSecretRowsAreSealed: what the table holds of a secret is its
// metadata and ciphertext; the value is nowhere in the clear, and the
// hosts column is what a lookup uses.
func TestSecretRowsAreSealed(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := handles(t, 1)[0]
	s, err := secret.Open(filepath.Join(t.TempDir(), "home"), secret.WithKeyFile(filepath.Join(t.TempDir(), "key")), secret.WithBackend(db.Secrets()))
	if err != nil {
		t.Fatal(err)
	}
	sec := secret.Secret{Name: "ghcr", Kind: secret.Basic, Registries: []secret.Pattern{"ghcr.io/acme", "ghcr.io/beta", "reg.example:5000"}}
	if _, err := s.Create(ctx, sec, secret.Value{Username: "bot-" + canary, Password: canary}); err != nil {
		t.Fatal(err)
	}
	var row string
	var hosts []string
	if err := db.pool.QueryRow(ctx, "SELECT row_to_json(p)::text, hosts FROM pull_secrets p").Scan(&row, &hosts); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(row, canary) {
		t.Fatalf("the row holds the value in the clear: %s", row)
	}
	if strings.Join(hosts, ",") != "ghcr.io,reg.example:5000" {
		t.Fatalf("hosts %v", hosts)
	}
	if !strings.Contains(s.Path(), "secret store in postgres") || strings.Contains(s.Path(), pgtestPassword(t)) {
		t.Fatalf("Path() = %q", s.Path())
	}
}

// TestPrune: expired ephemeral tokens, old access records and long
// expired leases go; everything else stays.
func TestPrune(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := handles(t, 1, WithAccessRetention(time.Hour))[0]
	now := time.Now().UTC().Truncate(time.Second)
	tokens := db.Tokens()
	for _, r := range []struct {
		id        string
		ephemeral bool
		expires   time.Time
	}{
		{"00000000000000e1", true, now.Add(-time.Minute)}, // goes
		{"00000000000000e2", true, now.Add(time.Hour)},
		{"00000000000000e3", false, now.Add(-time.Minute)}, // expired, but listed until revoked by hand
	} {
		rec := proxy.TokenRecord{TokenInfo: proxy.TokenInfo{ID: r.id, Project: "acme", Scopes: []string{proxy.ScopePull},
			Created: now.Add(-2 * time.Hour), Expires: r.expires, Ephemeral: r.ephemeral}, Hash: make([]byte, 32)}
		if err := tokens.Insert(ctx, rec); err != nil {
			t.Fatal(err)
		}
	}
	access := db.AccessRecords()
	old := cache.AccessKey{Project: "acme", Upstream: "reg.example", Repo: "old"}
	fresh := cache.AccessKey{Project: "acme", Upstream: "reg.example", Repo: "fresh"}
	if err := access.Record(ctx, old, now.Add(-2*time.Hour)); err != nil {
		t.Fatal(err)
	}
	if err := access.Record(ctx, fresh, now.Add(-time.Minute)); err != nil {
		t.Fatal(err)
	}
	if _, err := db.pool.Exec(ctx, `INSERT INTO fill_leases (key, holder, addr, expires) VALUES
		('dead', 'r1', 'a', now() - interval '2 hours'), ('lapsed', 'r1', 'a', now() - interval '1 minute')`); err != nil {
		t.Fatal(err)
	}
	if err := db.Prune(ctx); err != nil {
		t.Fatal(err)
	}
	list, err := tokens.List(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, i := range list {
		ids = append(ids, i.ID)
	}
	if strings.Join(ids, ",") != "00000000000000e2,00000000000000e3" {
		t.Errorf("tokens after Prune: %v", ids)
	}
	if _, ok, _ := access.Last(ctx, old); ok {
		t.Error("an access record past the retention survived Prune")
	}
	if _, ok, _ := access.Last(ctx, fresh); !ok {
		t.Error("Prune deleted a recent access record")
	}
	var leases []string
	rows, _ := db.pool.Query(ctx, "SELECT key FROM fill_leases ORDER BY key")
	for rows.Next() {
		var k string
		rows.Scan(&k)
		leases = append(leases, k)
	}
	if rows.Err() != nil || strings.Join(leases, ",") != "lapsed" {
		t.Errorf("leases after Prune: %v (%v)", leases, rows.Err())
	}
}

// TestLeasesUseTheDatabaseClock: a replica whose clock is an hour off
// still grants leases that expire ttl from now, by the database.
func TestLeasesUseTheDatabaseClock(t *testing.T) {
	t.Parallel()
	db := handles(t, 1, WithClock(func() time.Time { return time.Now().Add(time.Hour) }))[0]
	before := time.Now()
	l, ok, err := db.Leases().Acquire(context.Background(), "k", "r1", "a", 10*time.Second)
	if err != nil || !ok {
		t.Fatal(ok, err)
	}
	if l.Expires.Before(before.Add(9*time.Second)) || l.Expires.After(time.Now().Add(11*time.Second)) {
		t.Fatalf("lease expires %s, want about 10s after %s", l.Expires, before)
	}
}
