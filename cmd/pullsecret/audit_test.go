package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/pullsecret/pullsecret/audit"
	"github.com/pullsecret/pullsecret/internal/testbin"
	"github.com/pullsecret/pullsecret/proxy"
	"github.com/pullsecret/pullsecret/registry"
)

// TestAuditEndToEnd runs `pullsecret serve` in front of a private
// upstream: project acme pulls an image, project beta tries acme's
// upstream, the helper in remote mode fetches acme's credential. Then
// `pullsecret audit` answers who pulled what, with which token, when, and
// neither the upstream password nor a project token is anywhere in the
// trail or the command's output.
func TestAuditEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binaries and runs pullsecret serve")
	}
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	e := newEnv(t) // at cleanup: the canary in no output and no file of the home
	bin := testbin.Build(t, "pullsecret", "docker-credential-pullsecret")

	up, err := registry.Start(ctx, registry.WithHTPasswd(map[string]string{"bot": canary}))
	if err != nil {
		t.Fatal(err)
	}
	defer up.Close()
	img, err := up.SeedRandom(ctx, "team/app", "v1")
	if err != nil {
		t.Fatal(err)
	}
	imgDigest, _ := img.Digest()
	e.must(canary+"\n", "secret", "create", "up", "--registry", up.Host(), "--username", "bot", "--password-stdin", "--project", "acme")
	tokA := strings.TrimSpace(e.must("", "token", "create", "--project", "acme", "--scope", "pull"))
	tokC := strings.TrimSpace(e.must("", "token", "create", "--project", "acme", "--scope", "credentials"))
	tokB := strings.TrimSpace(e.must("", "token", "create", "--project", "beta", "--scope", "pull"))
	idA, _ := proxy.ParseTokenID(tokA)
	idB, _ := proxy.ParseTokenID(tokB)
	idC, _ := proxy.ParseTokenID(tokC)

	// The alias is acme's alone: to beta, "up" is no upstream.
	config := "allow_private_upstreams: [127.0.0.1/32]\nprojects:\n  acme:\n    aliases: {up: " + up.Host() + "}\n"
	srv := testbin.Serve(t, bin, []string{"PULLSECRET_HOME=" + e.home}, config)

	// 1. acme pulls the image: manifest, config and layers.
	ref, err := name.ParseReference(srv.Host+"/up/team/app:v1", name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	pulled, err := remote.Image(ref, remote.WithContext(ctx), remote.WithAuth(&authn.Basic{Username: "ci", Password: tokA}))
	if err != nil {
		t.Fatalf("pull: %v\n%s", err, srv.Logs())
	}
	if _, err := pulled.RawConfigFile(); err != nil {
		t.Fatal(err)
	}
	layers, err := pulled.Layers()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range layers {
		rc, err := l.Compressed()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.Copy(io.Discard, rc); err != nil {
			t.Fatal(err)
		}
		rc.Close()
	}

	// 2. beta tries acme's upstream.
	if _, err := remote.Image(ref, remote.WithContext(ctx), remote.WithAuth(&authn.Basic{Username: "ci", Password: tokB})); err == nil {
		t.Fatal("project beta pulled through acme's alias")
	}

	// 3. The helper in remote mode, as a client machine runs it.
	helper := exec.CommandContext(ctx, filepath.Join(bin, "docker-credential-pullsecret"), "get")
	helper.Env = []string{"HOME=" + t.TempDir(), "PATH=" + os.Getenv("PATH"),
		"PULLSECRET_SERVER=" + srv.URL, "PULLSECRET_TOKEN=" + tokC, "PULLSECRET_PROGRAM=" + filepath.Join(bin, "pullsecret")}
	helper.Stdin = strings.NewReader(up.Host())
	var hout, herr bytes.Buffer
	helper.Stdout, helper.Stderr = &hout, &herr
	if err := helper.Run(); err != nil {
		t.Fatalf("helper get: %v\nstdout: %.100s\nstderr: %s", err, strings.ReplaceAll(hout.String(), canary, "CANARY"), herr.String())
	}
	var cred struct{ Username, Secret string }
	if err := json.Unmarshal(hout.Bytes(), &cred); err != nil || cred.Username != "bot" || cred.Secret != canary {
		t.Fatalf("helper get: not acme's credential (%v)", err)
	}

	// The server writes its trail asynchronously: wait for the last event.
	trail := filepath.Join(e.home, audit.FileName)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		evs, _, _ := audit.ReadFile(ctx, trail, audit.Filter{})
		if len(evs) > 0 && evs[len(evs)-1].Via == audit.ViaHelper {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the helper's credential fetch is not in the trail after 10s: %+v\n%s", evs, srv.Logs())
		}
	}

	var printed []string // everything `pullsecret audit` printed
	auditCmd := func(args ...string) string {
		t.Helper()
		out := e.must("", append([]string{"audit"}, args...)...)
		printed = append(printed, out)
		return out
	}

	// `pullsecret audit --project acme -o json`: one JSON event per line.
	out := auditCmd("--project", "acme", "-o", "json")
	var acme []audit.Event
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		var ev audit.Event
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			t.Fatalf("-o json line %q: %v", sc.Text(), err)
		}
		acme = append(acme, ev)
	}
	manifests, blobs, creds := 0, 0, 0
	for _, ev := range acme {
		if ev.Project != "acme" || ev.Decision != audit.Allowed || !strings.HasPrefix(ev.Client, "127.0.0.1:") || ev.Time.IsZero() {
			t.Errorf("acme event: %+v", ev)
		}
		switch {
		case ev.Via == audit.ViaProxy && ev.Reference == "v1":
			manifests++
			if ev.Digest != imgDigest.String() || ev.TokenID != idA || ev.Upstream != up.Host() || ev.Repository != "team/app" || ev.Action != audit.ActionPull {
				t.Errorf("manifest event: %+v", ev)
			}
		case ev.Via == audit.ViaProxy:
			blobs++
			if ev.Digest == "" || ev.Digest != ev.Reference || ev.TokenID != idA {
				t.Errorf("blob event: %+v", ev)
			}
		case ev.Via == audit.ViaHelper:
			creds++
			if ev.Action != audit.ActionCredential || ev.TokenID != idC || ev.Secret != "up" || ev.Upstream != up.Host() {
				t.Errorf("credential event: %+v", ev)
			}
		}
	}
	if manifests != 1 || blobs != 1+len(layers) || creds != 1 {
		t.Errorf("acme: %d manifest, %d blob, %d credential events; want 1, %d, 1:\n%s", manifests, blobs, creds, 1+len(layers), out)
	}

	// `pullsecret audit --denied`: beta's attempt, and only that.
	out = auditCmd("--denied")
	t.Logf("pullsecret audit --denied:\n%s", out)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 2 || !strings.HasPrefix(lines[0], "TIME") {
		t.Fatalf("audit --denied: want a header and one line:\n%s", out)
	}
	for _, want := range []string{"beta", idB, "127.0.0.1:", "pull", "up/team/app:v1", "denied", "is not an upstream of project beta"} {
		if !strings.Contains(lines[1], want) {
			t.Errorf("audit --denied lacks %q:\n%s", want, out)
		}
	}

	// The table: acme's pull with its token id and the short digest.
	out = auditCmd("--project", "acme")
	t.Logf("pullsecret audit --project acme:\n%s", out)
	short := imgDigest.String()[:len("sha256:")+12]
	found := false
	for _, l := range strings.Split(out, "\n") {
		if strings.Contains(l, idA) && strings.Contains(l, up.Host()+"/team/app:v1") && strings.Contains(l, short) && strings.Contains(l, "allowed") {
			found = true
		}
	}
	if !found || !strings.Contains(out, "credential (helper)") || strings.Contains(out, "beta") {
		t.Errorf("audit --project acme:\n%s", out)
	}

	// --since and --limit.
	if out := auditCmd("--since", "1h", "-o", "json"); strings.Count(out, "\n") != len(acme)+1 {
		t.Errorf("--since 1h: %d events, want %d", strings.Count(out, "\n"), len(acme)+1)
	}
	if out := auditCmd("--since", time.Now().Add(time.Hour).UTC().Format(time.RFC3339), "-o", "json"); out != "" {
		t.Errorf("--since an hour ahead: %s", out)
	}
	if out := auditCmd("--limit", "1", "-o", "json"); !strings.Contains(out, `"via":"helper"`) || strings.Count(out, "\n") != 1 {
		t.Errorf("--limit 1: want the most recent event only:\n%s", out)
	}
	for _, args := range [][]string{{"audit", "--since", "yesterday"}, {"audit", "-o", "yaml"}, {"audit", "--limit", "-1"}} {
		if r := e.run("", args...); r.code != 2 {
			t.Errorf("%q: exit %d, want 2: %s", args, r.code, r.stderr)
		}
	}

	// No credential anywhere: not in the trail, not in any output.
	b, err := os.ReadFile(trail)
	if err != nil {
		t.Fatal(err)
	}
	all := strings.Join(printed, "\n")
	for _, s := range []string{canary, tokA, tokB, tokC} {
		if bytes.Contains(b, []byte(s)) {
			t.Errorf("the audit trail holds a credential (%.12s...)", s)
		}
		if strings.Contains(all, s) {
			t.Errorf("pullsecret audit printed a credential (%.12s...)", s)
		}
		if strings.Contains(srv.Logs(), s) {
			t.Errorf("the server logged a credential (%.12s...)", s)
		}
	}
}
