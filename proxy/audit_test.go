package proxy

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/pullsecret/pullsecret/audit"
	"github.com/pullsecret/pullsecret/proxy/cache"
)

// auditPX is a caching proxy whose audit trail goes to a file.
type auditPX struct {
	*pxFixture
	trail *audit.File
}

func newAuditPX(t *testing.T, aliases map[string]string) *auditPX {
	t.Helper()
	trail, err := audit.OpenFile(filepath.Join(t.TempDir(), audit.FileName))
	if err != nil {
		t.Fatal(err)
	}
	c, err := cache.OpenFilesystem(context.Background(), t.TempDir(), cache.WithTagTTL(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	records := cache.NewAccessRecords()
	f := newPXWith(t, []Option{WithAudit(trail), WithFetcher(func(next Fetcher) Fetcher {
		return NewCachedFetcher(next, c, records, CachedOptions{})
	})}, withAliases(aliases))
	t.Cleanup(func() { trail.Close(); c.Close(); records.Close() })
	return &auditPX{pxFixture: f, trail: trail}
}

// events flushes the trail and returns what it holds.
func (f *auditPX) events() []audit.Event {
	f.t.Helper()
	evs, err := f.trail.Query(f.ctx, audit.Filter{})
	if err != nil {
		f.t.Fatal(err)
	}
	return evs
}

// noSecrets checks that none of secrets is in the trail's file.
func noSecrets(t *testing.T, path string, secrets ...string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range secrets {
		if strings.Contains(string(b), s) {
			t.Errorf("the audit trail holds a credential (%.10s...)", s)
		}
	}
}

func describe(evs []audit.Event) string {
	var b strings.Builder
	for _, e := range evs {
		j, _ := json.Marshal(e)
		fmt.Fprintf(&b, "  %s\n", j)
	}
	return b.String()
}

// TestAuditProxyPulls covers every way a pull ends: allowed from the
// upstream and from the cache, refused at authentication, by the allowlist
// (another project's upstream), by the upstream, at the token server; and
// what is left out: challenges, HEADs, continuation ranges, tag lists.
func TestAuditProxyPulls(t *testing.T) {
	t.Parallel()
	up := pxUpstream(t, false)
	f := newAuditPX(t, map[string]string{"up": up.Host()})
	img, err := up.SeedRandom(f.ctx, "team/app", "v1")
	if err != nil {
		t.Fatal(err)
	}
	f.addSecret("acme", "up", up.Host(), pxUser, pxCanary)
	// acme's second upstream, which no alias names: not one of beta's.
	up2 := pxUpstream(t, false)
	f.addSecret("acme", "up2", up2.Host(), pxUser, pxCanary)
	tokA, tokB, tokR := f.token("acme", ScopePull), f.token("beta", ScopePull), f.token("acme", ScopePull)
	idA, _ := ParseTokenID(tokA)
	idB, _ := ParseTokenID(tokB)
	idR, _ := ParseTokenID(tokR)
	if _, err := f.tokens.Revoke(f.ctx, idR); err != nil {
		t.Fatal(err)
	}
	imgDigest, _ := img.Digest()
	layers, _ := img.Layers()
	layer0, _ := layers[0].Digest()
	cfgName, _ := img.ConfigName()

	pull := func(tok string) error {
		got, err := remote.Image(f.ref("up/team/app:v1"), f.client(tok)...)
		if err != nil {
			return err
		}
		if _, err := got.RawConfigFile(); err != nil {
			return err
		}
		ls, err := got.Layers()
		if err != nil {
			return err
		}
		for _, l := range ls {
			rc, err := l.Compressed()
			if err != nil {
				return err
			}
			_, err = io.Copy(io.Discard, rc)
			rc.Close()
			if err != nil {
				return err
			}
		}
		return nil
	}
	// Cold, then from the cache.
	for i := range 2 {
		if err := pull(tokA); err != nil {
			t.Fatalf("pull %d: %v", i, err)
		}
	}
	before := len(f.events())
	// Left out: the challenge, a HEAD, a range that continues a download,
	// a tag list.
	manifestPath := "/v2/up/team/app/manifests/v1"
	for _, resp := range []*http.Response{
		f.get(manifestPath, ""),
		f.do(http.MethodHead, manifestPath, tokA, nil),
		f.get("/v2/up/team/app/blobs/"+layer0.String(), tokA, "Range", "bytes=10-20"),
		f.get("/v2/up/team/app/tags/list", tokA),
		f.get("/token?scope=repository:up/team/app:pull", ""),
	} {
		f.readAll(resp)
	}
	if evs := f.events(); len(evs) != before {
		t.Fatalf("challenges, HEADs, continuation ranges and tag lists were recorded:\n%s", describe(evs[before:]))
	}
	// Refused: beta through the alias (the upstream wants credentials beta
	// has not), beta naming acme's upstream host, a bogus token, a revoked
	// one, a bad login at the token server.
	if err := pull(tokB); err == nil {
		t.Fatal("project beta pulled acme's image")
	}
	resp := f.get("/v2/"+up2.Host()+"/team/app/manifests/v1", tokB, "X-Forwarded-For", "203.0.113.9")
	if resp.StatusCode != http.StatusForbidden {
		t.Fatalf("beta on acme's upstream host: %d", resp.StatusCode)
	}
	f.readAll(resp)
	f.readAll(f.get(manifestPath, TokenPrefix+strings.Repeat("a", tokenLen-len(TokenPrefix))))
	f.readAll(f.get(manifestPath, tokR))
	f.readAll(f.get("/token?scope=repository:up/team/app:pull", "not-a-token"))

	evs := f.events()
	find := func(what string, match func(audit.Event) bool) []audit.Event {
		var out []audit.Event
		for _, e := range evs {
			if match(e) {
				out = append(out, e)
			}
		}
		if len(out) == 0 {
			t.Errorf("no event for %s in:\n%s", what, describe(evs))
		}
		return out
	}
	allowed := func(e audit.Event) bool {
		return e.Decision == audit.Allowed && e.Project == "acme" && e.TokenID == idA && e.Via == audit.ViaProxy &&
			e.Action == audit.ActionPull && e.Upstream == up.Host() && e.Repository == "team/app" && e.Status == http.StatusOK &&
			strings.HasPrefix(e.Client, "127.0.0.1:") && e.Secret == "up"
	}
	if ms := find("the manifest GETs", func(e audit.Event) bool {
		return allowed(e) && e.Reference == "v1" && e.Digest == imgDigest.String()
	}); len(ms) != 2 {
		t.Errorf("%d manifest events, want one per pull (2):\n%s", len(ms), describe(ms))
	}
	find("the config blob", func(e audit.Event) bool { return allowed(e) && e.Digest == cfgName.String() })
	if ls := find("the first layer", func(e audit.Event) bool {
		return allowed(e) && e.Reference == layer0.String() && e.Digest == layer0.String()
	}); len(ls) != 2 {
		t.Errorf("%d events for the first layer, want one per pull (2)", len(ls))
	}
	find("beta through the alias, refused by the upstream", func(e audit.Event) bool {
		return e.Decision == audit.Denied && e.Project == "beta" && e.TokenID == idB && e.Upstream == up.Host() &&
			e.Repository == "team/app" && e.Reference == "v1" && e.Status == http.StatusForbidden && e.Secret == "" &&
			strings.Contains(e.Reason, "project beta has no pull secret")
	})
	find("beta on acme's upstream host, refused by the allowlist", func(e audit.Event) bool {
		return e.Decision == audit.Denied && e.Project == "beta" && e.TokenID == idB && e.Upstream == up2.Host() &&
			e.Repository == "team/app" && strings.Contains(e.Reason, "is not an upstream of project beta") &&
			// X-Forwarded-For is not trusted by default.
			strings.HasPrefix(e.Client, "127.0.0.1:")
	})
	find("a bogus token", func(e audit.Event) bool {
		return e.Decision == audit.Denied && e.Project == "" && e.TokenID == "" && e.Status == http.StatusUnauthorized &&
			e.Upstream == "up" && e.Reason == "authentication failed: invalid credentials"
	})
	find("a revoked token, by id", func(e audit.Event) bool {
		return e.Decision == audit.Denied && e.TokenID == idR && e.Reason == "authentication failed: the project token was revoked"
	})
	find("a refused login at the token server", func(e audit.Event) bool {
		return e.Decision == audit.Denied && e.Status == http.StatusUnauthorized && e.Upstream == "up" &&
			e.Repository == "team/app" && e.Action == audit.ActionPull && strings.HasPrefix(e.Reason, "login refused")
	})
	for _, e := range evs {
		if e.Time.IsZero() || time.Since(e.Time) > time.Minute || e.Client == "" {
			t.Errorf("event without time or client: %+v", e)
		}
		if e.Decision == audit.Allowed && e.Digest == "" {
			t.Errorf("allowed pull without the digest served: %+v", e)
		}
	}
	noSecrets(t, f.trail.Path(), pxCanary, tokA, tokB, tokR)
}

// TestAuditProxyPushes: a push that lands is recorded per blob and per
// manifest, with digests; a push with a pull-only token is refused.
func TestAuditProxyPushes(t *testing.T) {
	t.Parallel()
	up := pxUpstream(t, true)
	f := newAuditPX(t, map[string]string{"up": up.Host()})
	f.addSecret("acme", "up", up.Host(), pxUser, pxCanary)
	push, pull := f.token("acme", ScopePull, ScopePush), f.token("acme", ScopePull)
	pushID, _ := ParseTokenID(push)
	img, err := random.Image(64<<10, 2)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(f.ref("up/ci/app:v1"), img, f.client(push)...); err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(f.ref("up/ci/app:v2"), img, f.client(pull)...); err == nil {
		t.Fatal("a pull-only token pushed")
	}
	evs := f.events()
	d, _ := img.Digest()
	layers, _ := img.Layers()
	want := map[string]bool{d.String(): false}
	for _, l := range layers {
		ld, _ := l.Digest()
		want[ld.String()] = false
	}
	denied := false
	for _, e := range evs {
		switch {
		case e.Decision == audit.Allowed:
			if e.Action != audit.ActionPush || e.TokenID != pushID || e.Upstream != up.Host() || e.Repository != "ci/app" {
				t.Errorf("allowed push event: %+v", e)
			}
			if _, ok := want[e.Digest]; ok {
				want[e.Digest] = true
			}
			if e.Digest == d.String() && e.Reference != "v1" {
				t.Errorf("manifest push without its tag: %+v", e)
			}
		case e.Action == audit.ActionPush && e.Project == "acme" && e.Status == http.StatusForbidden:
			denied = true
		}
	}
	for dg, seen := range want {
		if !seen {
			t.Errorf("no push event for %s:\n%s", dg, describe(evs))
		}
	}
	if !denied {
		t.Errorf("the refused push was not recorded:\n%s", describe(evs))
	}
	noSecrets(t, f.trail.Path(), pxCanary, push, pull)
}

// TestAuditCredentialAPI: the helper's remote mode records each answer,
// with the pull secret's name, and each refusal with its reason.
func TestAuditCredentialAPI(t *testing.T) {
	t.Parallel()
	trail, err := audit.OpenFile(filepath.Join(t.TempDir(), audit.FileName))
	if err != nil {
		t.Fatal(err)
	}
	defer trail.Close()
	f := newCredFixture(t, WithCredentialAudit(trail))
	credsTok, creds := f.create(TokenSpec{Project: "acme", Scopes: []string{"credentials"}})
	pullTok, pullInfo := f.create(TokenSpec{Project: "acme"})
	revokedTok, revoked := f.create(TokenSpec{Project: "acme", Scopes: []string{"credentials"}})
	if _, err := f.otherStore().Revoke(context.Background(), revoked.ID); err != nil {
		t.Fatal(err)
	}
	body := func(reg, repo string) string {
		b, _ := json.Marshal(CredentialRequest{Registry: reg, Repository: repo})
		return string(b)
	}
	for _, c := range []struct {
		authz, body string
		code        int
	}{
		{"Bearer " + credsTok, body("ghcr.io", "acme/app"), 200},
		{"Bearer " + pullTok, body("ghcr.io", "acme/app"), 403},
		{"Bearer " + credsTok, body("docker.io", "library/alpine"), 404},
		{"Bearer " + revokedTok, body("ghcr.io", ""), 401},
		{"", body("ghcr.io", ""), 401},
	} {
		if r := f.call(t, "", c.authz, c.body); r.code != c.code {
			t.Fatalf("%s: %d %s, want %d", c.body, r.code, r.body, c.code)
		}
	}
	evs, err := trail.Query(context.Background(), audit.Filter{})
	if err != nil {
		t.Fatal(err)
	}
	type want struct {
		decision                      audit.Decision
		project, token, secret, reach string
		status                        int
		reason                        string
	}
	wants := []want{
		{audit.Allowed, "acme", creds.ID, "ghcr", "ghcr.io/acme/app", 200, ""},
		{audit.Denied, "acme", pullInfo.ID, "", "ghcr.io/acme/app", 403, "lacks the credentials scope"},
		{audit.Denied, "acme", creds.ID, "", "docker.io/library/alpine", 404, "no pull secret of project acme"},
		{audit.Denied, "", revoked.ID, "", "", 401, "revoked"},
		{audit.Denied, "", "", "", "", 401, "send a project token"},
	}
	if len(evs) != len(wants) {
		t.Fatalf("%d events, want %d:\n%s", len(evs), len(wants), describe(evs))
	}
	for i, w := range wants {
		e := evs[i]
		reach := e.Upstream
		if e.Repository != "" {
			reach += "/" + e.Repository
		}
		if e.Decision != w.decision || e.Project != w.project || e.TokenID != w.token || e.Secret != w.secret ||
			reach != w.reach || e.Status != w.status || !strings.Contains(e.Reason, w.reason) ||
			e.Action != audit.ActionCredential || e.Via != audit.ViaHelper || !strings.HasPrefix(e.Client, "127.0.0.1:") {
			t.Errorf("event %d: %+v\nwant %+v", i, e, w)
		}
	}
	noSecrets(t, trail.Path(), credCanary, credTokenCanary, credsTok, pullTok, revokedTok)
}

func TestKubeletAuditEventMapping(t *testing.T) {
	t.Parallel()
	now := time.Date(2026, 2, 3, 4, 5, 6, 0, time.UTC)
	base := KubeletAuditEvent{Time: now, Issuer: "https://k8s", Namespace: "team-a", ServiceAccount: "builder", Pod: "web-1",
		Project: "acme", Image: "ghcr.io/acme/app:v1", Client: "10.0.0.7:4711"}
	for _, tc := range []struct {
		name    string
		mutate  func(*KubeletAuditEvent)
		want    audit.Decision
		subject string
		target  string // upstream/repository:reference
	}{
		{"credential", func(e *KubeletAuditEvent) { e.Outcome, e.Secret, e.Status = "credential", "gh", 200 }, audit.Allowed,
			"system:serviceaccount:team-a:builder pod web-1", "ghcr.io/acme/app:v1"},
		{"pull token", func(e *KubeletAuditEvent) {
			e.Outcome, e.TokenID, e.Image = "pull-token", "0123456789abcdef", "proxy.internal:5000/ghcr.io/acme/app@sha256:"+strings.Repeat("a", 64)
		}, audit.Allowed, "system:serviceaccount:team-a:builder pod web-1", "proxy.internal:5000/ghcr.io/acme/app:sha256:" + strings.Repeat("a", 64)},
		{"docker hub short name", func(e *KubeletAuditEvent) { e.Outcome, e.Image = "credential", "alpine" }, audit.Allowed,
			"system:serviceaccount:team-a:builder pod web-1", "docker.io/library/alpine:latest"},
		{"no binding", func(e *KubeletAuditEvent) { e.Outcome, e.Project, e.Pod = "no-binding", "", "" }, audit.Denied,
			"system:serviceaccount:team-a:builder", "ghcr.io/acme/app:v1"},
		{"invalid token", func(e *KubeletAuditEvent) {
			e.Outcome, e.Namespace, e.ServiceAccount, e.Project = "invalid-token", "", "", ""
		}, audit.Denied,
			"", "ghcr.io/acme/app:v1"},
		{"no match", func(e *KubeletAuditEvent) { e.Outcome = "no-match" }, audit.Denied, "system:serviceaccount:team-a:builder pod web-1", "ghcr.io/acme/app:v1"},
		{"resolution error", func(e *KubeletAuditEvent) { e.Outcome, e.Status = "error", 502 }, audit.Allowed,
			"system:serviceaccount:team-a:builder pod web-1", "ghcr.io/acme/app:v1"},
		{"bad image", func(e *KubeletAuditEvent) { e.Outcome, e.Image = "bad-request", "UPPER/Case!!" }, audit.Denied,
			"system:serviceaccount:team-a:builder pod web-1", ":UPPER/Case!!"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ev := base
			tc.mutate(&ev)
			e := kubeletAuditEvent(ev)
			target := e.Upstream
			if e.Repository != "" {
				target += "/" + e.Repository
			}
			target += ":" + e.Reference
			if e.Decision != tc.want || e.Subject != tc.subject || target != tc.target || e.Via != audit.ViaKubelet ||
				e.Action != audit.ActionCredential || !e.Time.Equal(now) || e.Client != ev.Client || e.TokenID != ev.TokenID ||
				e.Project != ev.Project || e.Secret != ev.Secret {
				t.Errorf("got %+v\nwant decision %s, subject %q, target %q", e, tc.want, tc.subject, tc.target)
			}
		})
	}
}

func TestAuditConfig(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		yaml    string
		want    AuditConfig
		wantErr string
	}{
		{"", AuditConfig{Enabled: true}, ""},
		{"audit: {path: /var/lib/ps/audit.jsonl}", AuditConfig{Enabled: true, Path: "/var/lib/ps/audit.jsonl"}, ""},
		{"audit: {enabled: false}", AuditConfig{}, ""},
		{"audit: {replica: eu-1}", AuditConfig{Enabled: true, Replica: "eu-1"}, ""},
		{"audit: {replica: 'a b'}", AuditConfig{}, "audit.replica"},
		{"audit: {pth: x}", AuditConfig{}, "pth"},
	} {
		cfg, err := ParseConfig([]byte(tc.yaml))
		switch {
		case tc.wantErr != "":
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("%q: error %v, want one naming %s", tc.yaml, err, tc.wantErr)
			}
		case err != nil:
			t.Errorf("%q: %v", tc.yaml, err)
		case cfg.Audit != tc.want:
			t.Errorf("%q: %+v, want %+v", tc.yaml, cfg.Audit, tc.want)
		}
	}
}

func TestAuditClient(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		xff   string
		trust bool
		want  string
	}{
		{"", false, "192.0.2.1:1234"},
		{"203.0.113.9", false, "192.0.2.1:1234"},
		{"203.0.113.9", true, "203.0.113.9"},
		{"198.51.100.1, 203.0.113.9", true, "203.0.113.9"}, // the address our proxy added
		{"203.0.113.9, <script>", true, "192.0.2.1:1234"},
		{"", true, "192.0.2.1:1234"},
	} {
		r, _ := http.NewRequest(http.MethodGet, "/v2/", nil)
		r.RemoteAddr = "192.0.2.1:1234"
		if tc.xff != "" {
			r.Header.Set("X-Forwarded-For", tc.xff)
		}
		if got := auditClient(r, tc.trust); got != tc.want {
			t.Errorf("X-Forwarded-For %q, trusted %v: %q, want %q", tc.xff, tc.trust, got, tc.want)
		}
	}
}
