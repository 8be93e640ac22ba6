package postgres

// Issue 7 end to end, as operators run it: three `pullsecret serve` replicas
// on one PostgreSQL database, each with its own data folder and the one
// key file, in front of an upstream registry with htpasswd. The admin
// commands run as separate processes given the servers' config. A secret
// rotated through the CLI is what every replica sends upstream at its next
// request; a token revoked through it is refused by every one at its next.
// The audit table holds each pull once, a cross-project attempt as denied,
// and never a credential or token.

import (
	"bytes"
	"context"
	"fmt"
	"io/fs"
	"net/http"
	"net/url"
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

const (
	canaryOld = "canary-e2e-old-pw-51d0"
	canaryNew = "canary-e2e-new-pw-a7c3"
)

func TestReplicasShareMetadata(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary and runs three pullsecret serve processes")
	}
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	srv := pgtest.Shared(t)
	dsn := pgtest.DSN(t)
	bin := testbin.Build(t, "pullsecret")

	up, err := registry.Start(ctx, registry.WithHTPasswd(map[string]string{"bot": canaryOld}))
	if err != nil {
		t.Fatal(err)
	}
	defer up.Close()
	for _, repo := range []string{"team/app1", "team/app2", "team/app3"} {
		if _, err := up.SeedRandom(ctx, repo, "v1"); err != nil {
			t.Fatal(err)
		}
	}

	// The DSN comes from a file, as from a mounted Kubernetes Secret; the
	// key file is shared by every replica and the CLI.
	dir := t.TempDir()
	dsnFile := filepath.Join(dir, "dsn")
	if err := os.WriteFile(dsnFile, []byte(dsn+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	keyFile := filepath.Join(dir, "master.key")
	config := fmt.Sprintf("allow_private_upstreams: [127.0.0.1/32]\naliases:\n  up: %s\n"+
		"metadata: {driver: postgres, dsn_file: %s}\nlog: {level: debug}\n", up.Host(), dsnFile)
	cfgFile := filepath.Join(dir, "serve.yaml")
	if err := os.WriteFile(cfgFile, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}

	var outputs []string
	secrets := []string{canaryOld, canaryNew, srv.Password, url.QueryEscape(srv.Password)}
	cliHome := filepath.Join(dir, "cli-home")
	cli := func(stdin string, env []string, args ...string) string {
		t.Helper()
		cmd := exec.CommandContext(ctx, filepath.Join(bin, "pullsecret"), args...)
		cmd.Env = append([]string{"PATH=" + os.Getenv("PATH"), "HOME=" + dir,
			"PULLSECRET_HOME=" + cliHome, "PULLSECRET_KEY_FILE=" + keyFile}, env...)
		cmd.Stdin = strings.NewReader(stdin)
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		err := cmd.Run()
		outputs = append(outputs, out.String(), errb.String())
		if err != nil {
			t.Fatalf("pullsecret %s: %v\n%s%s", strings.Join(args, " "), err, out.String(), errb.String())
		}
		return out.String()
	}
	withConfig := []string{"PULLSECRET_CONFIG=" + cfgFile}

	cli(canaryOld+"\n", withConfig, "secret", "create", "up", "--registry", up.Host(), "--username", "bot", "--password-stdin", "--project", "acme")
	tok := strings.TrimSpace(cli("", nil, "token", "create", "--config", cfgFile, "--project", "acme", "--scope", "pull"))
	tokID := tok[len("pst_") : len("pst_")+16]
	// Nothing went to the CLI's data folder: the records are in the
	// database.
	for _, f := range []string{"secrets.json", "tokens.json"} {
		if _, err := os.Stat(filepath.Join(cliHome, f)); err == nil {
			t.Fatalf("the CLI wrote %s to its data folder with metadata driver postgres", f)
		}
	}

	homes := []string{filepath.Join(dir, "home1"), filepath.Join(dir, "home2"), filepath.Join(dir, "home3")}
	var servers []*testbin.Server
	t.Cleanup(func() {
		// After the servers stopped (registered before they start): their
		// whole logs, the CLI's output and every file they wrote.
		for i, s := range servers {
			// The token is printed once, by token create; never by a server.
			if strings.Contains(s.Logs(), tok) {
				t.Errorf("serve #%d logged the project token", i+1)
			}
			outputs = append(outputs, s.Logs())
			if t.Failed() {
				t.Logf("serve #%d:\n%s", i+1, s.Logs())
			}
		}
		for _, out := range outputs {
			for _, sec := range secrets {
				if strings.Contains(out, sec) {
					t.Errorf("a credential (%.14s...) was printed:\n%s", sec, out)
				}
			}
		}
		for _, h := range append(homes, cliHome) {
			filepath.WalkDir(h, func(p string, d fs.DirEntry, err error) error {
				if err != nil || !d.Type().IsRegular() {
					return nil
				}
				b, _ := os.ReadFile(p)
				for _, sec := range []string{canaryOld, canaryNew, srv.Password} {
					if bytes.Contains(b, []byte(sec)) {
						t.Errorf("%s holds a credential in the clear", p)
					}
				}
				return nil
			})
		}
	})
	for _, h := range homes {
		s := testbin.Serve(t, bin, []string{"PULLSECRET_HOME=" + h, "PULLSECRET_KEY_FILE=" + keyFile}, config)
		servers = append(servers, s)
	}
	for i, s := range servers {
		if !strings.Contains(s.Logs(), "metadata=\"postgres ") {
			t.Fatalf("serve #%d does not say it uses the database:\n%s", i+1, s.Logs())
		}
	}

	get := func(s *testbin.Server, repo string) int {
		t.Helper()
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.URL+"/v2/up/"+repo+"/manifests/v1", nil)
		if err != nil {
			t.Fatal(err)
		}
		req.SetBasicAuth("ci", tok)
		req.Header.Set("Accept", "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	expect := func(stage, repo string, want int) {
		t.Helper()
		for i, s := range servers {
			if got := get(s, repo); got != want {
				t.Fatalf("%s: %s through serve #%d: status %d, want %d", stage, repo, i+1, got, want)
			}
		}
	}

	// 1. Every replica pulls with the secret the CLI stored.
	expect("secret created through the CLI", "team/app1", http.StatusOK)

	// 2. The registry password changes: a repository neither replica has
	// proven access to yet is refused upstream, by every one.
	if err := up.SetPassword("bot", canaryNew); err != nil {
		t.Fatal(err)
	}
	expect("upstream password changed, secret not yet", "team/app2", http.StatusForbidden)

	// 3. Rotated once, through the CLI: every replica sends the new password
	// at their next request, without a restart.
	cli(canaryNew+"\n", withConfig, "secret", "rotate", "up", "--password-stdin", "--project", "acme")
	expect("secret rotated through the CLI", "team/app3", http.StatusOK)
	expect("secret rotated through the CLI", "team/app2", http.StatusOK)

	// What the replicas learnt went to the database: the access records of
	// the three repositories, and the audit trail of every replica's pulls.
	db := open(t, dsn)
	var repos int
	if err := db.pool.QueryRow(ctx, "SELECT count(*) FROM access_records WHERE project = 'acme'").Scan(&repos); err != nil || repos != 3 {
		t.Fatalf("access records in the database: %d (%v), want 3", repos, err)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		var pulls int
		err := db.pool.QueryRow(ctx, `SELECT count(*) FROM audit_events
			WHERE project = 'acme' AND event->>'repository' = 'team/app1' AND decision = 'allowed'`).Scan(&pulls)
		if err != nil {
			t.Fatal(err)
		}
		if pulls >= len(servers) {
			if pulls > len(servers) {
				t.Fatalf("%d audited pulls of team/app1, want one per replica (%d)", pulls, len(servers))
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d audited pulls of team/app1 in the database after 10s, want one per replica", pulls)
		}
	}

	// A token of another project asks for acme's upstream: refused, and
	// recorded as denied with the project and the reason.
	other := strings.TrimSpace(cli("", withConfig, "token", "create", "--project", "beta", "--scope", "pull"))
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, servers[2].URL+"/v2/up/team/app1/manifests/v1", nil)
	req.SetBasicAuth("ci", other)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode == http.StatusOK {
		t.Fatal("a beta token pulled through acme's secret")
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		var reason string
		err := db.pool.QueryRow(ctx, `SELECT event->>'reason' FROM audit_events
			WHERE project = 'beta' AND decision = 'denied' AND event->>'repository' = 'team/app1'`).Scan(&reason)
		if err == nil {
			if !strings.Contains(reason, "project beta has no pull secret") {
				t.Errorf("the cross-project denial's reason: %q", reason)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no denied cross-project event in the database after 10s: %v", err)
		}
	}

	// 4. Revoked once, through the CLI: refused by every replica at its
	// next request.
	if out := cli("", nil, "token", "revoke", tokID, "--config", cfgFile); !strings.Contains(out, "revoked token "+tokID) {
		t.Fatalf("token revoke: %s", out)
	}
	expect("token revoked through the CLI", "team/app1", http.StatusUnauthorized)
	if list := cli("", withConfig, "token", "list", "-o", "json"); !strings.Contains(list, `"status": "revoked"`) {
		t.Fatalf("token list after revoke: %s", list)
	}

	// No audit record carries a credential or a token.
	rows, err := db.pool.Query(ctx, "SELECT event::text FROM audit_events")
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	n := 0
	for rows.Next() {
		var ev string
		if err := rows.Scan(&ev); err != nil {
			t.Fatal(err)
		}
		n++
		for _, sec := range append(secrets, tok, other) {
			if strings.Contains(ev, sec) {
				t.Errorf("an audit record holds a credential (%.8s...): %s", sec, ev)
			}
		}
	}
	if err := rows.Err(); err != nil || n == 0 {
		t.Fatalf("audit rows: %d, %v", n, err)
	}
}
