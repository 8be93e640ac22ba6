package main

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/pullsecret/pullsecret/proxy"
)

var tokenLine = regexp.MustCompile(`^pst_[0-9a-f]{16}_[a-z2-7]{52}\n$`)

// createToken runs `token create` and checks that stdout is the token alone.
func createToken(t *testing.T, e *env, args ...string) (tok, id string) {
	t.Helper()
	r := e.run("", append([]string{"token", "create"}, args...)...)
	if r.code != 0 {
		t.Fatalf("token create %q: exit %d: %s", args, r.code, r.stderr)
	}
	if !tokenLine.MatchString(r.stdout) {
		t.Fatalf("stdout is not one token line: %q", r.stdout)
	}
	tok = strings.TrimSpace(r.stdout)
	id, _ = proxy.ParseTokenID(tok)
	if !strings.Contains(r.stderr, "note: created token "+id) || strings.Contains(r.stderr, tok[len(tok)-52:]) {
		t.Fatalf("stderr: %q", r.stderr)
	}
	return tok, id
}

// noTokens fails if any token (or its secret part) shows up in s.
func noTokens(t *testing.T, s string, toks ...string) {
	t.Helper()
	for _, tok := range toks {
		if strings.Contains(s, tok) || strings.Contains(s, tok[len(tok)-52:]) {
			t.Fatalf("a token is shown: %s", s)
		}
	}
}

func TestTokenCreateListRevoke(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	tok, id := createToken(t, e, "--project", "acme", "--name", "ci-main", "--scope", "push", "--scope", "credentials",
		"--repository", "ghcr.io/acme/*", "--repository", "quay.io/acme", "--ttl", "30d")
	tok2, id2 := createToken(t, e) // defaults: project "default", pull, 30 days
	e.vars["PULLSECRET_PROJECT"] = "envproj"
	tok3, _ := createToken(t, e, "--ttl", "90m")

	ctx := context.Background()
	store, err := proxy.NewTokenStore(e.home)
	if err != nil {
		t.Fatal(err)
	}
	info, err := store.Verify(ctx, tok)
	if err != nil {
		t.Fatal(err)
	}
	if info.Project != "acme" || info.Name != "ci-main" || strings.Join(info.Scopes, ",") != "pull,push,credentials" ||
		strings.Join(info.Repositories, ",") != "ghcr.io/acme/*,quay.io/acme" {
		t.Fatalf("token 1: %+v", info)
	}
	if d := time.Until(info.Expires); d < 29*24*time.Hour || d > 30*24*time.Hour {
		t.Errorf("--ttl 30d gave %s", d)
	}
	info2, _ := store.Verify(ctx, tok2)
	if info2.Project != "default" || strings.Join(info2.Scopes, ",") != "pull" {
		t.Fatalf("defaults: %+v", info2)
	}
	info3, _ := store.Verify(ctx, tok3)
	if info3.Project != "envproj" || time.Until(info3.Expires) > 90*time.Minute {
		t.Fatalf("env project / ttl: %+v", info3)
	}

	// list: table and JSON, every project or one; never a token or hash.
	out := e.must("", "token", "list")
	noTokens(t, out, tok, tok2, tok3)
	for _, want := range []string{"ID", "STATUS", id, id2, "ci-main", "pull,push,credentials", "ghcr.io/acme/*,quay.io/acme", "active"} {
		if !strings.Contains(out, want) {
			t.Errorf("list lacks %q:\n%s", want, out)
		}
	}
	out = e.must("", "token", "list", "--project", "acme", "-o", "json")
	noTokens(t, out, tok, tok2, tok3)
	if strings.Contains(out, "sha256") || strings.Contains(out, "hash") {
		t.Fatalf("list shows the hash: %s", out)
	}
	var items []map[string]any
	if err := json.Unmarshal([]byte(out), &items); err != nil || len(items) != 1 {
		t.Fatalf("json list: %s %v", out, err)
	}
	for _, k := range []string{"id", "name", "project", "scopes", "repositories", "created", "expires", "revoked", "status"} {
		if _, ok := items[0][k]; !ok {
			t.Errorf("json list lacks %q", k)
		}
	}
	if items[0]["id"] != id || items[0]["revoked"] != nil || items[0]["status"] != "active" {
		t.Fatalf("json item %v", items[0])
	}
	if out := e.must("", "token", "list", "--project", "nobody", "-o", "json"); strings.TrimSpace(out) != "[]" {
		t.Fatalf("empty list: %q", out)
	}

	// revoke: at once, for a store already open (a running server).
	if _, err := store.Verify(ctx, tok); err != nil {
		t.Fatal(err)
	}
	out = e.must("", "token", "revoke", id)
	if !strings.Contains(out, "revoked token "+id) {
		t.Fatalf("revoke: %q", out)
	}
	if _, err := store.Verify(ctx, tok); !errors.Is(err, proxy.ErrTokenRevoked) {
		t.Fatalf("running store after revoke: %v", err)
	}
	if out := e.must("", "token", "revoke", id); !strings.Contains(out, "already revoked") {
		t.Fatalf("second revoke: %q", out)
	}
	out = e.must("", "token", "list", "-o", "json")
	if !strings.Contains(out, `"status": "revoked"`) {
		t.Fatalf("list after revoke: %s", out)
	}
	if _, err := store.Verify(ctx, tok2); err != nil {
		t.Fatalf("revoke hit another token: %v", err)
	}

	// The token file holds hashes only, mode 0600.
	path := filepath.Join(e.home, "tokens.json")
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	noTokens(t, string(data), tok, tok2, tok3)
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o600 {
		t.Errorf("tokens.json mode %v", fi.Mode().Perm())
	}
	// Each token was printed exactly once: by its create.
	for _, tk := range []string{tok, tok2, tok3} {
		n := 0
		for _, o := range e.outputs {
			n += strings.Count(o, tk)
		}
		if n != 1 {
			t.Errorf("a token was printed %d times", n)
		}
	}
}

func TestTokenCommandErrors(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	tok, _ := createToken(t, e, "--project", "acme")
	cases := []struct {
		args []string
		code int
		want string
	}{
		{[]string{"token", "create", "--scope", "admin"}, exitError, "unknown scope"},
		{[]string{"token", "create", "--ttl", "soon"}, exitUsage, "invalid --ttl"},
		{[]string{"token", "create", "--ttl", "-1h"}, exitUsage, "invalid --ttl"},
		{[]string{"token", "create", "--ttl", "100000d"}, exitUsage, "invalid --ttl"},
		{[]string{"token", "create", "--ttl", "50000h"}, exitError, "longer than the maximum"},
		{[]string{"token", "create", "--repository", "ghcr.io/a*b"}, exitError, "invalid repository pattern"},
		{[]string{"token", "create", "--project", "Bad_Project"}, exitError, "project"},
		{[]string{"token", "create", "--name", "has space"}, exitError, "invalid token name"},
		{[]string{"token", "create", "extra"}, exitUsage, "unexpected argument"},
		{[]string{"token", "create", "--token", "x"}, exitUsage, "unknown flag --token"},
		{[]string{"token", "list", "-o", "yaml"}, exitUsage, "unknown output format"},
		{[]string{"token", "list", "--project", "Bad"}, exitError, "project"},
		{[]string{"token", "revoke"}, exitUsage, "missing ID"},
		{[]string{"token", "revoke", "a", "b"}, exitUsage, "unexpected argument"},
		{[]string{"token", "revoke", "0123456789abcdef"}, exitError, "no project token has the id"},
		{[]string{"token", "revoke", "../../etc"}, exitError, "no project token has the id"},
		{[]string{"token", "revoke", tok}, exitUsage, "not the token"},
		{[]string{"token"}, exitUsage, "missing command"},
	}
	for _, c := range cases {
		r := e.run("", c.args...)
		if r.code != c.code || !strings.Contains(r.stderr, c.want) {
			t.Errorf("%q: exit %d, stderr %q; want exit %d with %q", c.args, r.code, r.stderr, c.code, c.want)
		}
		noTokens(t, r.stdout+r.stderr, tok)
	}
	// Help.
	if out := e.must("", "token", "create", "--help"); !strings.Contains(out, "TOKEN=$(pullsecret token create") {
		t.Errorf("help: %s", out)
	}
	if out := e.must("", "help"); !strings.Contains(out, "token") {
		t.Errorf("top help lacks token: %s", out)
	}
	// Nothing but the first token was stored.
	store, _ := proxy.NewTokenStore(e.home)
	list, _ := store.List(context.Background(), "")
	if len(list) != 1 {
		t.Fatalf("%d tokens stored, want 1", len(list))
	}
}

func TestParseTTL(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]time.Duration{"24h": 24 * time.Hour, "90m": 90 * time.Minute, "30d": 30 * 24 * time.Hour, "1d": 24 * time.Hour} {
		if got, err := parseTTL(in); err != nil || got != want {
			t.Errorf("parseTTL(%q) = %s %v", in, got, err)
		}
	}
	for _, in := range []string{"", "0", "0d", "-1d", "d", "1.5d", "-5m", "1y"} {
		if _, err := parseTTL(in); err == nil {
			t.Errorf("parseTTL(%q) accepted", in)
		}
	}
}
