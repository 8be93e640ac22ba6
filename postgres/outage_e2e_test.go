package postgres

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pullsecret/pullsecret/internal/pgtest"
	"github.com/pullsecret/pullsecret/internal/testbin"
	"github.com/pullsecret/pullsecret/registry"
)

// The database goes away under a running `pullsecret serve`: /readyz turns
// not-ready, requests get a clear 503, and when the database is back the
// server serves again without a restart.
func TestDatabaseOutage(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary, runs a PostgreSQL server and pullsecret serve")
	}
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	db, err := pgtest.Start(pgtest.Require(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Stop() })
	bin := testbin.Build(t, "pullsecret")
	up, err := registry.Start(ctx, registry.WithHTPasswd(map[string]string{"bot": clusterCanary}))
	if err != nil {
		t.Fatal(err)
	}
	defer up.Close()
	if _, err := up.SeedRandom(ctx, "team/app", "v1"); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	dsnFile := filepath.Join(dir, "dsn")
	if err := os.WriteFile(dsnFile, []byte(db.DSNFor("postgres")), 0o600); err != nil {
		t.Fatal(err)
	}
	config := fmt.Sprintf("allow_private_upstreams: [127.0.0.1/32]\naliases:\n  up: %s\nmetadata: {driver: postgres, dsn_file: %s}\n", up.Host(), dsnFile)
	cfgFile := filepath.Join(dir, "serve.yaml")
	if err := os.WriteFile(cfgFile, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	env := []string{"PATH=" + os.Getenv("PATH"), "HOME=" + dir, "PULLSECRET_HOME=" + filepath.Join(dir, "home"),
		"PULLSECRET_KEY_FILE=" + filepath.Join(dir, "key"), "PULLSECRET_CONFIG=" + cfgFile}
	cli := func(stdin string, args ...string) string {
		t.Helper()
		cmd := exec.CommandContext(ctx, filepath.Join(bin, "pullsecret"), args...)
		cmd.Env, cmd.Stdin = env, strings.NewReader(stdin)
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		if err := cmd.Run(); err != nil {
			t.Fatalf("pullsecret %s: %v\n%s%s", strings.Join(args, " "), err, out.String(), errb.String())
		}
		return out.String()
	}
	cli(clusterCanary+"\n", "secret", "create", "up", "--registry", up.Host(), "--username", "bot", "--password-stdin", "--project", "acme")
	tok := strings.TrimSpace(cli("", "token", "create", "--project", "acme", "--scope", "pull"))
	srv := testbin.Serve(t, bin, env[2:], config)
	t.Cleanup(func() {
		if strings.Contains(srv.Logs(), clusterCanary) || strings.Contains(srv.Logs(), tok) || strings.Contains(srv.Logs(), db.Password) {
			t.Error("serve logged a credential")
		}
		if t.Failed() {
			t.Logf("serve:\n%s", srv.Logs())
		}
	})

	get := func(path string, auth bool) (int, string) {
		t.Helper()
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, srv.URL+path, nil)
		req.Header.Set("Accept", "application/vnd.oci.image.manifest.v1+json")
		if auth {
			req.SetBasicAuth("ci", tok)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return resp.StatusCode, string(b)
	}
	manifest := "/v2/up/team/app/manifests/v1"
	if code, body := get(manifest, true); code != http.StatusOK {
		t.Fatalf("before the outage: %d %s", code, body)
	}

	db.Down()
	if code, body := get("/readyz", false); code != http.StatusServiceUnavailable {
		t.Errorf("/readyz with the database down: %d %q", code, body)
	}
	code, body := get(manifest, true)
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "unreachable") {
		t.Errorf("a pull with the database down: %d %s, want 503 UNAVAILABLE", code, body)
	}
	if strings.Contains(body, db.Password) || strings.Contains(body, clusterCanary) {
		t.Error("the error response holds a credential")
	}
	t.Logf("with the database down: %d %s", code, strings.TrimSpace(body))

	if err := db.Up(); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if code, _ := get("/readyz", false); code == http.StatusOK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("/readyz never came back after the database did")
		}
	}
	if code, body := get(manifest, true); code != http.StatusOK {
		t.Fatalf("after the outage: %d %s", code, body)
	}
}
