package proxy

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/pullsecret/pullsecret/secret"
)

const (
	credCanary      = "canary-pw-credapi-7e1f"
	credTokenCanary = "canary-idtoken-credapi-99"
)

// credFixture is a credential API over a sealed store holding canary
// secrets for two projects.
type credFixture struct {
	*authFixture
	store  *secret.Store
	srv    *httptest.Server
	apiLog *syncBuffer
	// bodies of every response but the credential ones
	others []string
}

func newCredFixture(t *testing.T, opts ...CredentialAPIOption) *credFixture {
	t.Helper()
	f := &credFixture{authFixture: newAuthFixture(t), apiLog: &syncBuffer{}}
	var err error
	if f.store, err = secret.Open(t.TempDir()); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for _, s := range []struct {
		sec secret.Secret
		v   secret.Value
	}{
		{secret.Secret{Project: "acme", Name: "ghcr", Kind: secret.Basic, Registries: []secret.Pattern{"ghcr.io/acme"}}, secret.Value{Username: "acme-bot", Password: credCanary}},
		{secret.Secret{Project: "acme", Name: "internal", Kind: secret.Token, Registries: []secret.Pattern{"registry.acme:5000"}}, secret.Value{IdentityToken: credTokenCanary}},
		{secret.Secret{Project: "other", Name: "quay", Kind: secret.Basic, Registries: []secret.Pattern{"quay.io"}}, secret.Value{Username: "other-bot", Password: credCanary + "-other"}},
	} {
		if _, err := f.store.Create(ctx, s.sec, s.v); err != nil {
			t.Fatal(err)
		}
	}
	log := slog.New(slog.NewTextHandler(f.apiLog, &slog.HandlerOptions{Level: slog.LevelDebug}))
	h := NewCredentialAPI(f.auth, f.store, append([]CredentialAPIOption{WithCredentialLogger(log)}, opts...)...)
	mux := http.NewServeMux()
	mux.Handle(CredentialAPIPath, h)
	f.srv = httptest.NewServer(mux)
	t.Cleanup(f.srv.Close)
	return f
}

type credResult struct {
	code    int
	body    string
	resp    CredentialResponse
	errCode string // registry error code
}

func (f *credFixture) call(t *testing.T, host, authz string, body string) credResult {
	t.Helper()
	req, _ := http.NewRequest("POST", f.srv.URL+CredentialAPIPath, strings.NewReader(body))
	if authz != "" {
		req.Header.Set("Authorization", authz)
	}
	req.Header.Set("Content-Type", "application/json")
	if host != "" {
		req.Host = host
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	r := credResult{code: resp.StatusCode, body: string(b)}
	if resp.StatusCode == 200 {
		if err := json.Unmarshal(b, &r.resp); err != nil {
			t.Fatalf("credential response %s: %v", b, err)
		}
		if resp.Header.Get("Cache-Control") != "no-store" {
			t.Error("credential response may be cached")
		}
	} else {
		var e struct {
			Errors []struct{ Code, Message string }
		}
		if json.Unmarshal(b, &e) != nil || len(e.Errors) != 1 || e.Errors[0].Message == "" {
			t.Fatalf("not a registry JSON error: %d %s", resp.StatusCode, b)
		}
		r.errCode = e.Errors[0].Code
		f.others = append(f.others, string(b))
	}
	return r
}

func TestCredentialAPI(t *testing.T) {
	t.Parallel()
	f := newCredFixture(t, WithProxyHosts("pullsecret.internal:5000"))
	credsTok, _ := f.create(TokenSpec{Project: "acme", Scopes: []string{"credentials"}})
	pullTok, _ := f.create(TokenSpec{Project: "acme"})
	pushTok, _ := f.create(TokenSpec{Project: "acme", Scopes: []string{"push"}})
	narrowTok, _ := f.create(TokenSpec{Project: "acme", Scopes: []string{"credentials"}, Repositories: []string{"ghcr.io/acme/app"}})
	revokedTok, revoked := f.create(TokenSpec{Project: "acme", Scopes: []string{"credentials", "pull"}})
	if _, err := f.otherStore().Revoke(context.Background(), revoked.ID); err != nil {
		t.Fatal(err)
	}
	jwtTok, err := f.auth.IssueRegistryToken(context.Background(), pullTok)
	if err != nil {
		t.Fatal(err)
	}
	bearer := func(tok string) string { return "Bearer " + tok }
	req := func(reg, repo string) string {
		b, _ := json.Marshal(CredentialRequest{Registry: reg, Repository: repo})
		return string(b)
	}
	proxyHost := strings.TrimPrefix(f.srv.URL, "http://")

	cases := []struct {
		name      string
		host      string
		authz     string
		body      string
		code      int
		errCode   string
		user, sec string
	}{
		{"credentials scope gets the pull secret", "", bearer(credsTok), req("ghcr.io", "acme/app"), 200, "", "acme-bot", credCanary},
		{"server URL forms", "", bearer(credsTok), req("https://ghcr.io/v2/acme/app", ""), 200, "", "acme-bot", credCanary},
		{"identity token secret", "", bearer(credsTok), req("registry.acme:5000", ""), 200, "", TokenUsername, credTokenCanary},
		{"no secret: 404", "", bearer(credsTok), req("docker.io", "library/alpine"), 404, "NOT_FOUND", "", ""},
		{"outside the secret's prefix: 404", "", bearer(credsTok), req("ghcr.io", "someone/app"), 404, "NOT_FOUND", "", ""},
		{"other project's secret: 404", "", bearer(credsTok), req("quay.io", "other/app"), 404, "NOT_FOUND", "", ""},
		{"pull scope cannot get credentials", "", bearer(pullTok), req("ghcr.io", "acme/app"), 403, "DENIED", "", ""},
		{"push scope cannot get credentials", "", bearer(pushTok), req("ghcr.io", "acme/app"), 403, "DENIED", "", ""},
		{"narrow token, its repository", "", bearer(narrowTok), req("ghcr.io", "acme/app"), 200, "", "acme-bot", credCanary},
		{"narrow token, another repository", "", bearer(narrowTok), req("ghcr.io", "acme/lib"), 403, "DENIED", "", ""},
		{"narrow token, no repository", "", bearer(narrowTok), req("ghcr.io", ""), 403, "DENIED", "", ""},
		{"proxy host (request Host), pull token", "", bearer(pullTok), req(proxyHost, ""), 200, "", TokenUsername, pullTok},
		{"proxy host with a repository", "", bearer(pushTok), req(proxyHost+"/ghcr.io/acme/app", ""), 200, "", TokenUsername, pushTok},
		{"configured proxy host", "", bearer(pullTok), req("https://pullsecret.internal:5000", ""), 200, "", TokenUsername, pullTok},
		{"proxy host needs pull", "", bearer(credsTok), req(proxyHost, ""), 403, "DENIED", "", ""},
		{"no auth", "", "", req("ghcr.io", ""), 401, "UNAUTHORIZED", "", ""},
		{"basic auth", "", "Basic eDp5", req("ghcr.io", ""), 401, "UNAUTHORIZED", "", ""},
		{"registry JWT instead of project token", "", bearer(jwtTok), req("ghcr.io", ""), 401, "UNAUTHORIZED", "", ""},
		{"wrong token", "", bearer(wrongToken(credsTok)), req("ghcr.io", ""), 401, "UNAUTHORIZED", "", ""},
		{"revoked token", "", bearer(revokedTok), req("ghcr.io", "acme/app"), 401, "UNAUTHORIZED", "", ""},
		{"bad JSON", "", bearer(credsTok), "{", 400, "UNSUPPORTED", "", ""},
		{"bad registry", "", bearer(credsTok), req("ftp://x", ""), 400, "NAME_INVALID", "", ""},
		{"user info in registry", "", bearer(credsTok), req("https://u:"+credCanary+"@ghcr.io", ""), 400, "NAME_INVALID", "", ""},
		{"bad repository", "", bearer(credsTok), req("ghcr.io", "../etc"), 400, "NAME_INVALID", "", ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := f.call(t, c.host, c.authz, c.body)
			if r.code != c.code || r.errCode != c.errCode {
				t.Fatalf("%d %s, want %d %s", r.code, r.body, c.code, c.errCode)
			}
			if c.code == 200 && (r.resp.Username != c.user || r.resp.Secret != c.sec) {
				t.Fatalf("answer %s", r.resp)
			}
		})
	}
	// GET is refused.
	resp, err := http.Get(f.srv.URL + CredentialAPIPath)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 405 {
		t.Fatalf("GET: %d", resp.StatusCode)
	}
	// Canaries: never in an error, nor in a log line; no token in the log.
	logs := f.apiLog.String() + f.logs.String()
	for _, canary := range []string{credCanary, credTokenCanary, "canary-"} {
		if strings.Contains(logs, canary) {
			t.Fatalf("canary %q in the log", canary)
		}
		for _, b := range f.others {
			if strings.Contains(b, canary) {
				t.Fatalf("canary %q in an error response: %s", canary, b)
			}
		}
	}
	for _, tok := range []string{credsTok, pullTok, pushTok, narrowTok, revokedTok, jwtTok} {
		if strings.Contains(logs, tok) {
			t.Fatal("a token is in the log")
		}
		for _, b := range f.others {
			if strings.Contains(b, tok) {
				t.Fatalf("a token is in an error response: %s", b)
			}
		}
	}
	if !strings.Contains(f.apiLog.String(), "secret=ghcr") {
		t.Errorf("answers not logged: %s", f.apiLog)
	}
}

func TestCredentialAPIExternalURLHost(t *testing.T) {
	t.Parallel()
	base := newAuthFixture(t)
	ext, _ := ParseExternalURL("https://registry.acme.example")
	a := NewAuth(base.tokens, base.signer, WithExternalURL(ext))
	store, _ := secret.Open(t.TempDir())
	h := NewCredentialAPI(a, store)
	tok, _ := base.create(TokenSpec{Project: "acme"})
	for _, reg := range []string{"registry.acme.example", "https://registry.acme.example:443/", "registry.acme.example/ghcr.io/acme/app"} {
		body, _ := json.Marshal(CredentialRequest{Registry: reg})
		r := httptest.NewRequest("POST", "http://10.0.0.1:5000"+CredentialAPIPath, bytes.NewReader(body))
		r.Header.Set("Authorization", "Bearer "+tok)
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		var resp CredentialResponse
		if w.Code != 200 || json.Unmarshal(w.Body.Bytes(), &resp) != nil || resp.Username != TokenUsername || resp.Secret != tok || resp.ExpiresAt == nil {
			t.Fatalf("%s: %d %s", reg, w.Code, w.Body)
		}
	}
	// Behind a reverse proxy, with forwarded headers trusted.
	fwd := NewCredentialAPI(NewAuth(base.tokens, base.signer, WithTrustForwardedHeaders(true)), store)
	plain := NewCredentialAPI(NewAuth(base.tokens, base.signer), store)
	for _, c := range []struct {
		h    http.Handler
		code int
	}{{fwd, 200}, {plain, 403}} {
		body, _ := json.Marshal(CredentialRequest{Registry: "proxy.acme.example"})
		r := httptest.NewRequest("POST", "http://10.0.0.1:5000"+CredentialAPIPath, bytes.NewReader(body))
		r.Header.Set("Authorization", "Bearer "+tok)
		r.Header.Set("X-Forwarded-Host", "proxy.acme.example")
		r.Header.Set("X-Forwarded-Proto", "https")
		w := httptest.NewRecorder()
		c.h.ServeHTTP(w, r)
		if w.Code != c.code {
			t.Fatalf("forwarded host: %d %s, want %d", w.Code, w.Body, c.code)
		}
	}
}
