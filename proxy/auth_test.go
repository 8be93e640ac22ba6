package proxy

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func basicReq(tok string) *http.Request {
	r := httptest.NewRequest("GET", "http://proxy.test/v2/", nil)
	r.SetBasicAuth("anyone", tok)
	return r
}

func bearerReq(tok string) *http.Request {
	r := httptest.NewRequest("GET", "http://proxy.test/v2/", nil)
	r.Header.Set("Authorization", "Bearer "+tok)
	return r
}

func TestAuthenticate(t *testing.T) {
	t.Parallel()
	f := newAuthFixture(t)
	tok, info := f.create(TokenSpec{Project: "acme", Scopes: []string{"pull"}, Repositories: []string{"ghcr.io/acme"}})

	r := httptest.NewRequest("GET", "/v2/", nil)
	if _, err := f.auth.Authenticate(r); !errors.Is(err, ErrNoAuth) {
		t.Fatalf("no header: %v", err)
	}
	for name, r := range map[string]*http.Request{"basic": basicReq(tok), "bearer project token": bearerReq(tok)} {
		p, err := f.auth.Authenticate(r)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if p.Project != "acme" || p.TokenID != info.ID || p.Access != nil || !p.HasScope(ScopePull) || p.HasScope(ScopePush) || len(p.Repositories) != 1 {
			t.Fatalf("%s: principal %+v", name, p)
		}
	}
	bad := []*http.Request{basicReq("wrong"), bearerReq("pst_0123456789abcdef_" + strings.Repeat("a", tokenSecretLen))}
	r = httptest.NewRequest("GET", "/v2/", nil)
	r.Header.Set("Authorization", "Digest x")
	bad = append(bad, r)
	r = httptest.NewRequest("GET", "/v2/", nil)
	r.Header.Set("Authorization", "Basic !!!")
	bad = append(bad, r)
	for _, r := range bad {
		if _, err := f.auth.Authenticate(r); !errors.Is(err, ErrInvalidToken) {
			t.Fatalf("%q: %v, want ErrInvalidToken", r.Header.Get("Authorization"), err)
		}
	}
	// JWT with empty access: Access is empty, not nil.
	jwtTok, err := f.auth.IssueRegistryToken(context.Background(), tok)
	if err != nil {
		t.Fatal(err)
	}
	p, err := f.auth.Authenticate(bearerReq(jwtTok))
	if err != nil || p.Access == nil || len(p.Access) != 0 {
		t.Fatalf("empty-access JWT: %+v %v", p, err)
	}
	if f.auth.Allows(p, "ghcr.io/acme/app", "pull") {
		t.Fatal("a token with empty access allows a pull")
	}
	if strings.Contains(f.logs.String(), tok) {
		t.Fatal("a token is in the log")
	}
}

func TestRevocationSeenByRunningAuth(t *testing.T) {
	t.Parallel()
	f := newAuthFixture(t)
	tok, info := f.create(TokenSpec{Project: "acme", Scopes: []string{"push"}})
	jwtTok, err := f.auth.IssueRegistryToken(context.Background(), tok, "repository:ghcr.io/acme/app:pull,push")
	if err != nil {
		t.Fatal(err)
	}
	p, err := f.auth.Authenticate(bearerReq(jwtTok))
	if err != nil || !f.auth.Allows(p, "ghcr.io/acme/app", "push") {
		t.Fatalf("before revoke: %+v %v", p, err)
	}
	if _, err := f.auth.Authenticate(basicReq(tok)); err != nil {
		t.Fatal(err)
	}
	// `pullsecret token revoke` in another process.
	if _, err := f.otherStore().Revoke(context.Background(), info.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := f.auth.Authenticate(bearerReq(jwtTok)); !errors.Is(err, ErrTokenRevoked) {
		t.Fatalf("JWT of a revoked token: %v, want ErrTokenRevoked", err)
	}
	if _, err := f.auth.Authenticate(basicReq(tok)); !errors.Is(err, ErrTokenRevoked) {
		t.Fatalf("revoked token on /v2/: %v, want ErrTokenRevoked", err)
	}
	srv := httptest.NewServer(f.auth.TokenHandler())
	defer srv.Close()
	req, _ := http.NewRequest("GET", srv.URL+"/token?service=pullsecret", nil)
	req.SetBasicAuth("x", tok)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 401 {
		t.Fatalf("token server for a revoked token: %d", resp.StatusCode)
	}
}

func TestAllows(t *testing.T) {
	t.Parallel()
	f := newAuthFixture(t)
	mk := func(spec TokenSpec) *Principal {
		tok, _ := f.create(spec)
		p, err := f.auth.Authenticate(basicReq(tok))
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	pull := mk(TokenSpec{Project: "acme"})
	push := mk(TokenSpec{Project: "acme", Scopes: []string{"push"}})
	creds := mk(TokenSpec{Project: "acme", Scopes: []string{"credentials"}})
	scoped := mk(TokenSpec{Project: "acme", Scopes: []string{"push"}, Repositories: []string{"ghcr.io/acme/*", "quay.io/team/app"}})
	jwtP := &Principal{Project: "acme", Scopes: []string{"pull", "push"}, Access: []Access{
		{Type: "repository", Name: "ghcr.io/acme/app", Actions: []string{"pull"}},
		{Type: "repository", Name: "ghcr.io/acme/rw", Actions: []string{"pull", "push"}},
		{Type: "registry", Name: "ghcr.io/acme/reg", Actions: []string{"pull"}},
	}}
	jwtPullToken := &Principal{Project: "acme", Scopes: []string{"pull"}, Access: []Access{
		{Type: "repository", Name: "ghcr.io/acme/rw", Actions: []string{"pull", "push"}},
	}}
	cases := []struct {
		name   string
		p      *Principal
		repo   string
		action string
		want   bool
	}{
		{"nil principal", nil, "ghcr.io/acme/app", "pull", false},
		{"pull token pulls", pull, "ghcr.io/acme/app", "pull", true},
		{"pull token cannot push", pull, "ghcr.io/acme/app", "push", false},
		{"push token pushes", push, "ghcr.io/acme/app", "push", true},
		{"push token pulls", push, "ghcr.io/acme/app", "pull", true},
		{"credentials token cannot pull", creds, "ghcr.io/acme/app", "pull", false},
		{"unknown action", push, "ghcr.io/acme/app", "delete", false},
		{"pattern covers", scoped, "ghcr.io/acme/app", "push", true},
		{"pattern excludes parent", scoped, "ghcr.io/acme", "pull", false},
		{"pattern excludes other", scoped, "ghcr.io/other/app", "pull", false},
		{"exact pattern", scoped, "quay.io/team/app", "pull", true},
		{"exact pattern sibling", scoped, "quay.io/team/app2", "pull", false},
		{"invalid name", push, "ghcr.io/acme/../x", "pull", false},
		{"no upstream", push, "app", "pull", false},
		{"jwt grants pull", jwtP, "ghcr.io/acme/app", "pull", true},
		{"jwt lacks push", jwtP, "ghcr.io/acme/app", "push", false},
		{"jwt grants push", jwtP, "ghcr.io/acme/rw", "push", true},
		{"jwt other repo", jwtP, "ghcr.io/acme/other", "pull", false},
		{"jwt registry type ignored", jwtP, "ghcr.io/acme/reg", "pull", false},
		{"jwt push but token pull-only", jwtPullToken, "ghcr.io/acme/rw", "push", false},
	}
	for _, c := range cases {
		if got := f.auth.Allows(c.p, c.repo, c.action); got != c.want {
			t.Errorf("%s: Allows(%s, %s) = %v, want %v", c.name, c.repo, c.action, got, c.want)
		}
	}
	// The repository filter applies to project tokens on /v2/.
	filtered := NewAuth(f.tokens, f.signer, WithRepositoryFilter(func(_ context.Context, project, name string) bool {
		return project == "acme" && strings.HasPrefix(name, "ghcr.io/")
	}))
	if !filtered.Allows(pull, "ghcr.io/acme/app", "pull") || filtered.Allows(pull, "quay.io/acme/app", "pull") {
		t.Error("repository filter not applied to project-token principals")
	}
}

// parseChallenge splits a Bearer challenge into its parameters.
func parseChallenge(t *testing.T, h string) map[string]string {
	t.Helper()
	rest, ok := strings.CutPrefix(h, "Bearer ")
	if !ok {
		t.Fatalf("challenge %q is not Bearer", h)
	}
	out := map[string]string{}
	for rest != "" {
		k, v, ok := strings.Cut(rest, "=\"")
		if !ok {
			t.Fatalf("bad challenge %q", h)
		}
		var val strings.Builder
		i := 0
		for ; i < len(v) && v[i] != '"'; i++ {
			if v[i] == '\\' {
				i++
			}
			val.WriteByte(v[i])
		}
		out[k] = val.String()
		rest = strings.TrimPrefix(v[i+1:], ",")
	}
	return out
}

func TestChallenge(t *testing.T) {
	t.Parallel()
	f := newAuthFixture(t)
	ext, err := ParseExternalURL("https://proxy.example.com:8443/")
	if err != nil {
		t.Fatal(err)
	}
	withExt := NewAuth(f.tokens, f.signer, WithExternalURL(ext), WithService("registry.acme"))
	fwd := NewAuth(f.tokens, f.signer, WithTrustForwardedHeaders(true))
	cases := []struct {
		name    string
		a       *Auth
		setup   func(r *http.Request)
		scope   string
		err     error
		realm   string
		service string
		errParm string
	}{
		{"from host", f.auth, nil, "repository:ghcr.io/acme/app:pull", ErrNoAuth, "http://proxy.test:5000/token", "pullsecret", ""},
		{"tls", f.auth, func(r *http.Request) { r.TLS = &tls.ConnectionState{} }, "", ErrNoAuth, "https://proxy.test:5000/token", "pullsecret", ""},
		{"external url", withExt, nil, "", nil, "https://proxy.example.com:8443/token", "registry.acme", ""},
		{"forwarded ignored by default", f.auth, func(r *http.Request) {
			r.Header.Set("X-Forwarded-Host", "evil.example")
			r.Header.Set("X-Forwarded-Proto", "https")
		}, "", ErrNoAuth, "http://proxy.test:5000/token", "pullsecret", ""},
		{"forwarded trusted", fwd, func(r *http.Request) {
			r.Header.Set("X-Forwarded-Host", "proxy.example.com, inner")
			r.Header.Set("X-Forwarded-Proto", "https")
		}, "", ErrNoAuth, "https://proxy.example.com/token", "pullsecret", ""},
		{"bad forwarded host", fwd, func(r *http.Request) { r.Header.Set("X-Forwarded-Host", `a"b`) }, "", ErrNoAuth, "http://localhost/token", "pullsecret", ""},
		{"insufficient scope", f.auth, nil, "repository:ghcr.io/acme/app:push", ErrInsufficientScope, "http://proxy.test:5000/token", "pullsecret", "insufficient_scope"},
		{"invalid token", f.auth, nil, "", ErrTokenRevoked, "http://proxy.test:5000/token", "pullsecret", "invalid_token"},
		{"quote in scope", f.auth, nil, `repository:a"b:pull`, ErrNoAuth, "http://proxy.test:5000/token", "pullsecret", ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := httptest.NewRequest("GET", "http://proxy.test:5000/v2/", nil)
			if c.setup != nil {
				c.setup(r)
			}
			w := httptest.NewRecorder()
			c.a.Challenge(w, r, c.scope, c.err)
			if w.Code != 401 {
				t.Fatalf("status %d", w.Code)
			}
			ch := parseChallenge(t, w.Header().Get("WWW-Authenticate"))
			if ch["realm"] != c.realm || ch["service"] != c.service || ch["scope"] != c.scope || ch["error"] != c.errParm {
				t.Fatalf("challenge %q -> %v", w.Header().Get("WWW-Authenticate"), ch)
			}
			var body struct {
				Errors []struct{ Code, Message string }
			}
			if err := json.Unmarshal(w.Body.Bytes(), &body); err != nil || len(body.Errors) != 1 || body.Errors[0].Code != "UNAUTHORIZED" || body.Errors[0].Message == "" {
				t.Fatalf("body %s", w.Body)
			}
		})
	}
	// Rate limited: 429 with Retry-After, no challenge.
	w := httptest.NewRecorder()
	f.auth.Challenge(w, httptest.NewRequest("GET", "/v2/", nil), "", &RateLimitError{RetryAfter: 1500 * time.Millisecond})
	if w.Code != 429 || w.Header().Get("Retry-After") != "2" || !strings.Contains(w.Body.String(), "TOOMANYREQUESTS") {
		t.Fatalf("rate limited: %d %v %s", w.Code, w.Header(), w.Body)
	}
	for _, bad := range []string{"ftp://x", "https://", "https://u:p@x", "https://x/?q=1", "x"} {
		if _, err := ParseExternalURL(bad); err == nil {
			t.Errorf("ParseExternalURL(%q) accepted", bad)
		} else if strings.Contains(err.Error(), "u:p") {
			t.Errorf("ParseExternalURL error shows user info: %v", err)
		}
	}
}

func TestLoginRateLimit(t *testing.T) {
	t.Parallel()
	var failures atomic.Int32
	f := newAuthFixture(t, WithLoginRateLimit(10, time.Minute), WithAuthFailureHook(func(string) { failures.Add(1) }))
	tok, info := f.create(TokenSpec{Project: "acme"})
	wrong := wrongToken(tok)

	fromAddr := func(r *http.Request, addr string) *http.Request { r.RemoteAddr = addr; return r }
	for i := range 10 {
		if _, err := f.auth.Authenticate(fromAddr(basicReq(wrong), "192.0.2.1:1000")); !errors.Is(err, ErrInvalidToken) {
			t.Fatalf("failure %d: %v", i+1, err)
		}
	}
	// The 11th failure for this token id, from anywhere, is limited.
	_, err := f.auth.Authenticate(fromAddr(basicReq(wrong), "198.51.100.7:1000"))
	var rl *RateLimitError
	if !errors.As(err, &rl) || rl.RetryAfter <= 0 || rl.RetryAfter > time.Minute {
		t.Fatalf("11th failure: %v", err)
	}
	// The real token still works: successful logins are never limited.
	if _, err := f.auth.Authenticate(basicReq(tok)); err != nil {
		t.Fatalf("good login while limited: %v", err)
	}
	// Over HTTP: 429 with Retry-After at the token endpoint.
	srv := httptest.NewServer(f.auth.TokenHandler())
	defer srv.Close()
	req, _ := http.NewRequest("GET", srv.URL+"/token", nil)
	req.SetBasicAuth("x", wrong)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 429 || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("token endpoint: %d %v", resp.StatusCode, resp.Header)
	}
	// After the window, failures answer 401 again.
	f.clock.Advance(time.Minute)
	if _, err := f.auth.Authenticate(basicReq(wrong)); !errors.Is(err, ErrInvalidToken) {
		t.Fatalf("after window: %v", err)
	}

	// Unknown ids are counted per client address.
	unknown := TokenPrefix + "0123456789abcdef_" + strings.Repeat("a", tokenSecretLen)
	for range 10 {
		f.auth.Authenticate(fromAddr(basicReq(unknown), "203.0.113.5:1"))
	}
	if _, err := f.auth.Authenticate(fromAddr(basicReq("garbage"), "203.0.113.5:2")); !errors.As(err, &rl) {
		t.Fatalf("11th failure from one address: %v", err)
	}
	if _, err := f.auth.Authenticate(fromAddr(basicReq(unknown), "203.0.113.6:1")); !errors.Is(err, ErrInvalidToken) {
		t.Fatalf("another address is not limited: %v", err)
	}
	// IPv6 clients are counted per /64.
	for i := range 11 {
		_, err = f.auth.Authenticate(fromAddr(basicReq("garbage"), "[2001:db8::"+string(rune('1'+i%9))+"]:1"))
	}
	if !errors.As(err, &rl) {
		t.Fatalf("IPv6 /64 not counted together: %v", err)
	}
	logs := f.logs.String()
	if strings.Contains(logs, tok) || strings.Contains(logs, wrong) || strings.Contains(logs, tok[len(tok)-tokenSecretLen:]) {
		t.Fatal("a credential is in the log")
	}
	if !strings.Contains(logs, info.ID) || !strings.Contains(logs, "rate-limited") {
		t.Errorf("failures not logged with the token id: %s", logs)
	}
	if failures.Load() == 0 {
		t.Error("failure hook not called")
	}
	// Off.
	off := NewAuth(f.tokens, f.signer, WithLoginRateLimit(0, 0))
	for range 20 {
		if _, err := off.Authenticate(basicReq(wrong)); errors.As(err, &rl) {
			t.Fatal("rate limit not turned off")
		}
	}
}

func TestFailureLimiterBounded(t *testing.T) {
	t.Parallel()
	l := newFailureLimiter(1, time.Minute)
	now := time.Now()
	for i := range maxLimiterEntries + 10 {
		l.fail(strconv.Itoa(i), now)
	}
	if n := len(l.entries); n > maxLimiterEntries {
		t.Fatalf("limiter holds %d entries", n)
	}
}
