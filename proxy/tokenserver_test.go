package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	ggcrregistry "github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/pullsecret/pullsecret/secret"
)

// getToken calls GET /token with Basic auth.
func getToken(t *testing.T, base, password string, q url.Values) (int, tokenResponse, string) {
	t.Helper()
	req, _ := http.NewRequest("GET", base+"/token?"+q.Encode(), nil)
	if password != "" {
		req.SetBasicAuth("someone", password)
	}
	return doToken(t, req)
}

// postToken calls POST /token with a form.
func postToken(t *testing.T, base string, form url.Values) (int, tokenResponse, string) {
	t.Helper()
	req, _ := http.NewRequest("POST", base+"/token", strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	return doToken(t, req)
}

func doToken(t *testing.T, req *http.Request) (int, tokenResponse, string) {
	t.Helper()
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var tr tokenResponse
	if resp.StatusCode == 200 {
		if err := json.Unmarshal(b, &tr); err != nil {
			t.Fatalf("token response %s: %v", b, err)
		}
		if cc := resp.Header.Get("Cache-Control"); cc != "no-store" {
			t.Errorf("Cache-Control %q", cc)
		}
	}
	return resp.StatusCode, tr, string(b)
}

// claimsOf decodes a registry token's claims after checking its signature.
func claimsOf(t *testing.T, s *Signer, tok string) accessClaims {
	t.Helper()
	var c accessClaims
	if err := s.verify(tok, &c); err != nil {
		t.Fatalf("verify issued token: %v", err)
	}
	return c
}

func accessString(a []Access) string { return scopeString(a) }

func TestTokenServerGetAndPost(t *testing.T) {
	t.Parallel()
	f := newAuthFixture(t)
	srv := httptest.NewServer(f.auth.TokenHandler())
	defer srv.Close()
	tok, info := f.create(TokenSpec{Project: "acme", Scopes: []string{"push"}})

	// GET, scope repeated and space-separated.
	q := url.Values{"service": {"pullsecret"}, "scope": {"repository:ghcr.io/acme/app:pull", "repository:ghcr.io/acme/lib:push repository:ghcr.io/acme/app:push"}}
	code, tr, body := getToken(t, srv.URL, tok, q)
	if code != 200 {
		t.Fatalf("GET: %d %s", code, body)
	}
	if tr.Token == "" || tr.Token != tr.AccessToken || tr.ExpiresIn != 300 || tr.RefreshToken != "" {
		t.Fatalf("GET response %+v", tr)
	}
	if _, err := time.Parse(time.RFC3339, tr.IssuedAt); err != nil {
		t.Fatalf("issued_at %q", tr.IssuedAt)
	}
	c := claimsOf(t, f.signer, tr.Token)
	now := f.clock.Now()
	if c.Issuer != "pullsecret" || c.Subject != info.ID || !slices.Equal(c.Audience, jwt.Audience{"pullsecret"}) ||
		c.Project != "acme" || c.Use != useAccess || c.ID == "" ||
		!c.Expiry.Time().Equal(now.Add(5*time.Minute)) || !c.IssuedAt.Time().Equal(now) || !c.NotBefore.Time().Equal(now) {
		t.Fatalf("claims %+v", c)
	}
	if got := accessString(c.Access); got != "repository:ghcr.io/acme/app:pull,push repository:ghcr.io/acme/lib:push" {
		t.Fatalf("access %s", got)
	}
	if tr.Scope != accessString(c.Access) {
		t.Errorf("scope %q", tr.Scope)
	}
	// The raw JSON carries the fields clients read.
	var raw map[string]any
	json.Unmarshal([]byte(body), &raw)
	for _, k := range []string{"token", "access_token", "expires_in", "issued_at"} {
		if _, ok := raw[k]; !ok {
			t.Errorf("response lacks %q", k)
		}
	}
	// The header names our key, and nothing else to trust.
	jws, err := jose.ParseSigned(tr.Token, []jose.SignatureAlgorithm{jose.ES256})
	if err != nil || jws.Signatures[0].Header.KeyID != f.signer.KeyID() || jws.Signatures[0].Header.JSONWebKey != nil {
		t.Fatalf("header: %+v %v", jws.Signatures[0].Header, err)
	}

	// No scope: empty access (the /v2/ ping), as an empty list.
	code, tr, _ = getToken(t, srv.URL, tok, url.Values{"service": {"pullsecret"}})
	if code != 200 || len(claimsOf(t, f.signer, tr.Token).Access) != 0 || !strings.Contains(string(mustPayload(t, tr.Token)), `"access":[]`) {
		t.Fatalf("no-scope token: %d %s", code, mustPayload(t, tr.Token))
	}

	// GET with offline_token=true (Docker login) gets a refresh token.
	code, tr, _ = getToken(t, srv.URL, tok, url.Values{"offline_token": {"true"}, "client_id": {"docker"}})
	if code != 200 || tr.RefreshToken == "" {
		t.Fatalf("offline GET: %d %+v", code, tr)
	}

	// POST password grant, offline.
	code, tr, body = postToken(t, srv.URL, url.Values{
		"grant_type": {"password"}, "username": {"ci"}, "password": {tok}, "service": {"pullsecret"},
		"client_id": {"containerd"}, "access_type": {"offline"}, "scope": {"repository:ghcr.io/acme/app:pull"},
	})
	if code != 200 || tr.RefreshToken == "" || accessString(claimsOf(t, f.signer, tr.Token).Access) != "repository:ghcr.io/acme/app:pull" {
		t.Fatalf("POST password: %d %s", code, body)
	}
	refresh := tr.RefreshToken

	// POST refresh grant with the refresh token, and with the project token
	// itself (an identity token from the helper).
	for name, rt := range map[string]string{"refresh JWT": refresh, "project token": tok} {
		code, tr, body = postToken(t, srv.URL, url.Values{
			"grant_type": {"refresh_token"}, "refresh_token": {rt}, "service": {"pullsecret"},
			"scope": {"repository:ghcr.io/acme/app:push"},
		})
		if code != 200 || accessString(claimsOf(t, f.signer, tr.Token).Access) != "repository:ghcr.io/acme/app:push" || tr.RefreshToken != "" {
			t.Fatalf("POST refresh (%s): %d %s", name, code, body)
		}
	}

	bad := []struct {
		name string
		do   func() (int, tokenResponse, string)
		code int
	}{
		{"GET no auth", func() (int, tokenResponse, string) { return getToken(t, srv.URL, "", nil) }, 401},
		{"GET wrong password", func() (int, tokenResponse, string) { return getToken(t, srv.URL, "nope", nil) }, 401},
		{"GET wrong service", func() (int, tokenResponse, string) {
			return getToken(t, srv.URL, tok, url.Values{"service": {"registry.docker.io"}})
		}, 400},
		{"GET bad scope", func() (int, tokenResponse, string) {
			return getToken(t, srv.URL, tok, url.Values{"scope": {"repository:app"}})
		}, 400},
		{"GET too many scopes", func() (int, tokenResponse, string) {
			return getToken(t, srv.URL, tok, url.Values{"scope": {strings.Repeat("repository:ghcr.io/a/b:pull ", 65)}})
		}, 400},
		{"POST unknown grant", func() (int, tokenResponse, string) {
			return postToken(t, srv.URL, url.Values{"grant_type": {"client_credentials"}})
		}, 400},
		{"POST wrong password", func() (int, tokenResponse, string) {
			return postToken(t, srv.URL, url.Values{"grant_type": {"password"}, "username": {"x"}, "password": {"wrong"}})
		}, 401},
		{"POST access token as refresh", func() (int, tokenResponse, string) {
			return postToken(t, srv.URL, url.Values{"grant_type": {"refresh_token"}, "refresh_token": {tr.Token}})
		}, 401},
		{"POST not a form", func() (int, tokenResponse, string) {
			req, _ := http.NewRequest("POST", srv.URL+"/token", strings.NewReader(`{"grant_type":"password"}`))
			req.Header.Set("Content-Type", "application/json")
			return doToken(t, req)
		}, 400},
		{"DELETE", func() (int, tokenResponse, string) {
			req, _ := http.NewRequest("DELETE", srv.URL+"/token", nil)
			return doToken(t, req)
		}, 405},
	}
	for _, b := range bad {
		code, _, body := b.do()
		if code != b.code {
			t.Errorf("%s: %d %s, want %d", b.name, code, body, b.code)
		}
		var e struct {
			Errors []struct{ Code, Message string }
		}
		if json.Unmarshal([]byte(body), &e) != nil || len(e.Errors) == 0 {
			t.Errorf("%s: not a registry error: %s", b.name, body)
		}
		if strings.Contains(body, tok) || strings.Contains(body, refresh) {
			t.Errorf("%s: the response quotes a credential", b.name)
		}
	}

	// A revoked token's refresh token stops working.
	if _, err := f.otherStore().Revoke(context.Background(), info.ID); err != nil {
		t.Fatal(err)
	}
	code, _, _ = postToken(t, srv.URL, url.Values{"grant_type": {"refresh_token"}, "refresh_token": {refresh}})
	if code != 401 {
		t.Fatalf("refresh after revoke: %d", code)
	}
	if logs := f.logs.String(); strings.Contains(logs, tok) || strings.Contains(logs, refresh) {
		t.Fatal("a credential is in the log")
	}
}

func mustPayload(t *testing.T, tok string) []byte {
	t.Helper()
	jws, err := jose.ParseSigned(tok, []jose.SignatureAlgorithm{jose.ES256})
	if err != nil {
		t.Fatal(err)
	}
	return jws.UnsafePayloadWithoutVerification()
}

func TestGrantIntersection(t *testing.T) {
	t.Parallel()
	// Project acme's pull secrets cover ghcr.io/acme and registry.acme:5000;
	// project other's cover quay.io/other.
	home := t.TempDir()
	store, err := secret.Open(home)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for _, s := range []struct {
		project, name string
		regs          []secret.Pattern
	}{
		{"acme", "ghcr", []secret.Pattern{"ghcr.io/acme"}},
		{"acme", "internal", []secret.Pattern{"registry.acme:5000"}},
		{"other", "quay", []secret.Pattern{"quay.io/other"}},
	} {
		if _, err := store.Create(ctx, secret.Secret{Project: s.project, Name: s.name, Kind: secret.Basic, Registries: s.regs},
			secret.Value{Username: "u", Password: "canary-pw-grant"}); err != nil {
			t.Fatal(err)
		}
	}
	f := newAuthFixture(t, WithRepositoryFilter(ProjectSecretsFilter(store)))
	srv := httptest.NewServer(f.auth.TokenHandler())
	defer srv.Close()
	pull, _ := f.create(TokenSpec{Project: "acme"})
	push, _ := f.create(TokenSpec{Project: "acme", Scopes: []string{"push"}})
	creds, _ := f.create(TokenSpec{Project: "acme", Scopes: []string{"credentials"}})
	scoped, _ := f.create(TokenSpec{Project: "acme", Scopes: []string{"push"}, Repositories: []string{"ghcr.io/acme/app"}})
	wild, _ := f.create(TokenSpec{Project: "acme", Repositories: []string{"ghcr.io/acme/*"}})
	other, _ := f.create(TokenSpec{Project: "other", Scopes: []string{"push"}})

	cases := []struct {
		name  string
		tok   string
		scope string
		want  string
	}{
		{"pull token asks pull", pull, "repository:ghcr.io/acme/app:pull", "repository:ghcr.io/acme/app:pull"},
		{"pull token asks push: no push", pull, "repository:ghcr.io/acme/app:pull,push", "repository:ghcr.io/acme/app:pull"},
		{"pull token asks only push: omitted", pull, "repository:ghcr.io/acme/app:push", ""},
		{"push token asks push", push, "repository:ghcr.io/acme/app:push,pull", "repository:ghcr.io/acme/app:pull,push"},
		{"star means pull and push", push, "repository:ghcr.io/acme/app:*", "repository:ghcr.io/acme/app:pull,push"},
		{"star for pull token", pull, "repository:ghcr.io/acme/app:*", "repository:ghcr.io/acme/app:pull"},
		{"delete never granted", push, "repository:ghcr.io/acme/app:delete", ""},
		{"credentials token gets nothing", creds, "repository:ghcr.io/acme/app:pull", ""},
		{"other project's upstream not granted", push, "repository:quay.io/other/app:pull", ""},
		{"other project gets its own", other, "repository:quay.io/other/app:pull", "repository:quay.io/other/app:pull"},
		{"other project not acme's", other, "repository:ghcr.io/acme/app:pull", ""},
		{"upstream outside secret prefix", push, "repository:ghcr.io/acmeother/app:pull", ""},
		{"registry with port", pull, "repository:registry.acme:5000/team/app:pull", "repository:registry.acme:5000/team/app:pull"},
		{"pattern covers", scoped, "repository:ghcr.io/acme/app:push", "repository:ghcr.io/acme/app:push"},
		{"pattern excludes", scoped, "repository:ghcr.io/acme/lib:pull", ""},
		{"pattern keeps some", scoped, "repository:ghcr.io/acme/lib:pull repository:ghcr.io/acme/app/sub:pull", "repository:ghcr.io/acme/app/sub:pull"},
		{"wildcard excludes parent", wild, "repository:ghcr.io/acme:pull repository:ghcr.io/acme/x:pull", "repository:ghcr.io/acme/x:pull"},
		{"catalog never", push, "registry:catalog:*", ""},
		{"resource class", pull, "repository(plugin):ghcr.io/acme/app:pull", "repository:ghcr.io/acme/app:pull"},
		{"no upstream in name", pull, "repository:app:pull", ""},
		{"path tricks", pull, "repository:ghcr.io/acme/../other:pull repository:ghcr.io/v2/acme/app:pull", ""},
		{"merged", push, "repository:ghcr.io/acme/app:pull repository:ghcr.io/acme/app:push", "repository:ghcr.io/acme/app:pull,push"},
		{"mirror-mode name without upstream", pull, "repository:acme/app:pull", ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			code, tr, body := getToken(t, srv.URL, c.tok, url.Values{"scope": {c.scope}})
			if code != 200 {
				t.Fatalf("%d %s", code, body)
			}
			if got := accessString(claimsOf(t, f.signer, tr.Token).Access); got != c.want {
				t.Fatalf("granted %q, want %q", got, c.want)
			}
		})
	}
}

// registryFront is a trivial registry in front of go-containerregistry's
// in-memory one: /token is our token server and every /v2/ request goes
// through Authenticate, Allows and Challenge, so real clients prove they
// accept our challenge and tokens.
func registryFront(t *testing.T, a *Auth) (*httptest.Server, *syncBuffer) {
	t.Helper()
	backend := ggcrregistry.New(ggcrregistry.Logger(log.New(io.Discard, "", 0)))
	mux := http.NewServeMux()
	seen := &syncBuffer{} // token requests: method and grant type
	th := a.TokenHandler()
	mux.HandleFunc("/token", func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost {
			r.ParseForm()
		}
		fmt.Fprintf(seen, "%s %s\n", r.Method, r.PostForm.Get("grant_type"))
		th.ServeHTTP(w, r)
	})
	mux.HandleFunc("/v2/", func(w http.ResponseWriter, r *http.Request) {
		repo, action := v2Access(r)
		scope := ""
		if repo != "" {
			scope = "repository:" + repo + ":" + action
		}
		p, err := a.Authenticate(r)
		if err != nil {
			a.Challenge(w, r, scope, err)
			return
		}
		if repo != "" && !a.Allows(p, repo, action) {
			if p.Access != nil {
				a.Challenge(w, r, scope, ErrInsufficientScope)
				return
			}
			writeAuthError(w, http.StatusForbidden, "DENIED", "not allowed")
			return
		}
		backend.ServeHTTP(w, r)
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return srv, seen
}

// v2Access is the repository and action of a /v2/ request.
func v2Access(r *http.Request) (string, string) {
	p := strings.TrimPrefix(r.URL.Path, "/v2/")
	for _, seg := range []string{"/manifests/", "/blobs/", "/tags/", "/referrers/"} {
		if i := strings.LastIndex(p, seg); i > 0 {
			action := "pull"
			if r.Method != http.MethodGet && r.Method != http.MethodHead {
				action = "push"
			}
			return p[:i], action
		}
	}
	return "", ""
}

func TestRealClientFlows(t *testing.T) {
	t.Parallel()
	f := newAuthFixture(t)
	f.clock.real = true // real clients use the real clock
	srv, seen := registryFront(t, f.auth)
	host := strings.TrimPrefix(srv.URL, "http://")
	ref := func(repo string) name.Reference {
		r, err := name.ParseReference(host+"/"+repo+":v1", name.Insecure)
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	push, _ := f.create(TokenSpec{Project: "acme", Scopes: []string{"push"}})
	pull, pullInfo := f.create(TokenSpec{Project: "acme"})
	narrow, _ := f.create(TokenSpec{Project: "acme", Repositories: []string{"ghcr.io/acme/app"}})
	basic := func(tok string) remote.Option { return remote.WithAuth(&authn.Basic{Username: "ci", Password: tok}) }
	identity := func(tok string) remote.Option {
		return remote.WithAuth(authn.FromConfig(authn.AuthConfig{Username: "<token>", IdentityToken: tok}))
	}

	img, err := random.Image(1024, 2)
	if err != nil {
		t.Fatal(err)
	}
	want, _ := img.Digest()
	for _, repo := range []string{"ghcr.io/acme/app", "ghcr.io/acme/other"} {
		if err := remote.Write(ref(repo), img, basic(push)); err != nil {
			t.Fatalf("push %s with a push token (GET /token, Basic): %v", repo, err)
		}
	}
	pullOK := func(name, repo string, opt remote.Option) {
		t.Helper()
		got, err := remote.Image(ref(repo), opt)
		if err != nil {
			t.Fatalf("%s: pull %s: %v", name, repo, err)
		}
		d, _ := got.Digest()
		layers, err := got.Layers()
		if err != nil || d != want {
			t.Fatalf("%s: digest %s, want %s (%v)", name, d, want, err)
		}
		for _, l := range layers {
			rc, err := l.Compressed()
			if err != nil {
				t.Fatalf("%s: layer: %v", name, err)
			}
			io.Copy(io.Discard, rc)
			rc.Close()
		}
	}
	pullFails := func(name, repo string, opt remote.Option) error {
		t.Helper()
		_, err := remote.Image(ref(repo), opt)
		if err == nil {
			t.Fatalf("%s: pull %s succeeded", name, repo)
		}
		return err
	}
	pullOK("pull token, Basic (GET /token)", "ghcr.io/acme/app", basic(pull))
	pullOK("pull token as identity token (POST refresh_token)", "ghcr.io/acme/app", identity(pull))
	if !strings.Contains(seen.String(), "GET \n") || !strings.Contains(seen.String(), "POST refresh_token\n") {
		t.Fatalf("the clients did not use both token flows: %q", seen.String())
	}
	pullOK("push token pulls", "ghcr.io/acme/other", basic(push))
	pullOK("narrow token, its repository", "ghcr.io/acme/app", basic(narrow))
	pullFails("narrow token, another repository", "ghcr.io/acme/other", basic(narrow))
	err = pullFails("wrong password", "ghcr.io/acme/app", basic(wrongToken(pull)))
	if strings.Contains(err.Error(), pull[len(pull)-tokenSecretLen:len(pull)-1]) {
		t.Fatalf("client error quotes the credential: %v", err)
	}
	if err := remote.Write(ref("ghcr.io/acme/app2"), img, basic(pull)); err == nil {
		t.Fatal("a pull token pushed")
	}
	if _, err := remote.Head(ref("ghcr.io/acme/app2"), basic(push)); err == nil {
		t.Fatal("the pull token's failed push left an image")
	}
	// Revoked: stops at once, for new and existing clients.
	puller := remote.WithAuth(&authn.Basic{Username: "x", Password: pull})
	pullOK("before revoke", "ghcr.io/acme/app", puller)
	if _, err := f.otherStore().Revoke(context.Background(), pullInfo.ID); err != nil {
		t.Fatal(err)
	}
	var terr interface{ Error() string }
	err = pullFails("revoked", "ghcr.io/acme/app", puller)
	if !errors.As(err, &terr) || !strings.Contains(strings.ToLower(err.Error()), "unauthorized") {
		t.Fatalf("revoked: %v", err)
	}
	pullFails("revoked identity token", "ghcr.io/acme/app", identity(pull))
	if logs := f.logs.String(); strings.Contains(logs, pull) || strings.Contains(logs, push) {
		t.Fatal("a token is in the log")
	}
}

// FuzzParseScopes checks that any scope parameters parse without panic,
// within bounds, and that grants never exceed the token.
func FuzzParseScopes(f *testing.F) {
	for _, s := range []string{
		"repository:ghcr.io/acme/app:pull",
		"repository:registry.example.com:5000/app:pull,push repository:x/y:*",
		"registry:catalog:*",
		"repository(plugin):a/b:pull",
		"repository::pull", ":::", "a:b", "repository:a/b:", "repository:a/b:,,pull,",
		"repository:ghcr.io/acme/../x:pull",
		strings.Repeat("repository:a/b:pull ", 70),
	} {
		f.Add(s, "pull")
	}
	f.Fuzz(func(t *testing.T, scope, extra string) {
		got, err := ParseScopes([]string{scope, extra})
		if err != nil {
			return
		}
		if len(got) > maxScopes {
			t.Fatalf("%d scopes", len(got))
		}
		for _, a := range got {
			if a.Type == "" || a.Name == "" || len(a.Actions) == 0 || strings.ContainsAny(a.Name, " \t\n") {
				t.Fatalf("bad parse %+v of %q", a, scope)
			}
		}
		au := &Auth{}
		info := TokenInfo{Project: "acme", Scopes: []string{"pull"}, Repositories: []string{"ghcr.io/acme"}}
		for _, g := range au.grant(context.Background(), info, got) {
			if g.Type != "repository" || !slices.Equal(g.Actions, []string{"pull"}) || !MatchRepositoryPattern("ghcr.io/acme", g.Name) {
				t.Fatalf("grant %+v exceeds the token (asked %q)", g, scope)
			}
		}
	})
}
