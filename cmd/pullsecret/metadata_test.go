package main

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pullsecret/pullsecret/proxy"
)

// TestConfigReachesTheServersStore: the token and secret commands given
// the server's config (--config, or $PULLSECRET_CONFIG) use the store it
// names (here the file driver and the config's data folder), not the
// environment's.
func TestConfigReachesTheServersStore(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	serverHome := filepath.Join(t.TempDir(), "server-home")
	cfg := filepath.Join(t.TempDir(), "serve.yaml")
	if err := os.WriteFile(cfg, []byte("home: "+serverHome+"\nmetadata: {driver: file}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tok := strings.TrimSpace(e.must("", "token", "create", "--config", cfg, "--project", "acme"))
	id, ok := proxy.ParseTokenID(tok)
	if !ok {
		t.Fatalf("token create printed %q", tok)
	}
	if _, err := os.Stat(filepath.Join(serverHome, "tokens.json")); err != nil {
		t.Fatalf("the token is not in the config's data folder: %v", err)
	}
	if out := e.must("", "token", "list", "-o", "json"); strings.Contains(out, id) {
		t.Fatal("the token is in the environment's data folder too")
	}
	e.must("", "token", "revoke", id, "--config", cfg)
	var list []tokenListItem
	if err := json.Unmarshal([]byte(e.must("", "token", "list", "--config", cfg, "-o", "json")), &list); err != nil {
		t.Fatal(err)
	}
	if len(list) != 1 || list[0].Status != "revoked" {
		t.Fatalf("token list --config after revoke: %+v", list)
	}

	e.vars["PULLSECRET_CONFIG"] = cfg
	e.must(canary, "secret", "create", "ghcr", "--registry", "ghcr.io", "--username", "bot", "--password-stdin")
	if _, err := os.Stat(filepath.Join(serverHome, "secrets.json")); err != nil {
		t.Fatalf("$PULLSECRET_CONFIG: the secret is not in the config's data folder: %v", err)
	}
	checkHomeNoCanary(t, serverHome)
	// --home still wins over the config's home.
	if out := e.must("", "secret", "list", "--home", e.home); strings.Contains(out, "ghcr") {
		t.Fatalf("secret list --home shows the config's secrets:\n%s", out)
	}
	if out := e.must("", "secret", "list"); !strings.Contains(out, "ghcr") {
		t.Fatalf("secret list with $PULLSECRET_CONFIG:\n%s", out)
	}
}

// TestConfigDatabaseErrors: a config naming a database that cannot be
// reached fails the command with a message that does not hold the DSN's
// password (the canary: newEnv greps every output for it).
func TestConfigDatabaseErrors(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close() // nothing listens there now
	dir := t.TempDir()
	dsnFile := filepath.Join(dir, "dsn")
	os.WriteFile(dsnFile, []byte(fmt.Sprintf("postgres://ps:%s@127.0.0.1:%d/meta?connect_timeout=5\n", canary, port)), 0o600)
	for _, tc := range []struct {
		name, config, want string
	}{
		{"unreachable", "metadata: {driver: postgres, dsn_file: " + dsnFile + "}\n", "metadata: postgres ps@127.0.0.1"},
		{"bad dsn", "metadata: {driver: postgres, dsn: 'postgres://ps:" + canary + "@127.0.0.1:notaport/x'}\n", "not a valid PostgreSQL connection string"},
		{"no dsn file", "metadata: {driver: postgres, dsn_file: " + filepath.Join(dir, "none") + "}\n", "metadata.dsn_file"},
		{"bad config", "metadata: {driver: mysql}\n", `metadata.driver: "mysql"`},
	} {
		cfg := filepath.Join(dir, tc.name+".yaml")
		os.WriteFile(cfg, []byte(tc.config), 0o600)
		for _, args := range [][]string{
			{"token", "list", "--config", cfg},
			{"secret", "list", "--config", cfg},
		} {
			r := e.run("", args...)
			if r.code != 1 || !strings.Contains(r.stderr, tc.want) {
				t.Errorf("%s: pullsecret %s: exit %d, stderr %q; want 1 and %q", tc.name, strings.Join(args, " "), r.code, r.stderr, tc.want)
			}
		}
	}
}
