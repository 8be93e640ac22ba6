package registry

import (
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
)

var testUsers = map[string]string{"alice": "alice-pw", "bob": "bob-pw"}

func TestPullAuth(t *testing.T) {
	t.Parallel()
	modes := map[string][]Option{
		"none":     nil,
		"htpasswd": {WithHTPasswd(testUsers)},
		"token":    {WithTokenAuth(testUsers)},
	}
	cases := []struct {
		name string
		auth authn.Authenticator
		// wantStatus per mode; 0 means the pull succeeds.
		want map[string]int
	}{
		{"anonymous", authn.Anonymous, map[string]int{"none": 0, "htpasswd": 401, "token": 401}},
		{"right password", &authn.Basic{Username: "alice", Password: "alice-pw"}, map[string]int{"none": 0, "htpasswd": 0, "token": 0}},
		{"other user", &authn.Basic{Username: "bob", Password: "bob-pw"}, map[string]int{"none": 0, "htpasswd": 0, "token": 0}},
		{"wrong password", &authn.Basic{Username: "alice", Password: "bob-pw"}, map[string]int{"none": 0, "htpasswd": 401, "token": 401}},
		{"unknown user", &authn.Basic{Username: "carol", Password: "x"}, map[string]int{"none": 0, "htpasswd": 401, "token": 401}},
		{"seed user guessed", &authn.Basic{Username: seedUser, Password: ""}, map[string]int{"none": 0, "htpasswd": 401, "token": 401}},
	}
	for mode, opts := range modes {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			r := start(t, opts...)
			img, err := r.SeedRandom(t.Context(), "t/app", "v1", Layers(2))
			if err != nil {
				t.Fatal(err)
			}
			for _, c := range cases {
				t.Run(c.name, func(t *testing.T) {
					got, err := pull(r, r.Ref("t/app", "v1"), c.auth)
					want := c.want[mode]
					if want == 0 {
						if err != nil {
							t.Fatalf("pull: %v", err)
						}
						if digestOf(t, got) != digestOf(t, img) {
							t.Error("pulled a different image")
						}
						return
					}
					if statusOf(err) != want {
						t.Fatalf("pull error %v, want status %d", err, want)
					}
				})
			}
		})
	}
}

// TestChallenges checks what a client sees before it authenticates: the
// WWW-Authenticate challenge and a registry JSON error body.
func TestChallenges(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name       string
		opts       []Option
		path       string
		wantStatus int
		wantAuth   func(r *Registry) string
	}{
		{"none", nil, "/v2/", 200, func(*Registry) string { return "" }},
		{"htpasswd", []Option{WithHTPasswd(testUsers)}, "/v2/", 401,
			func(*Registry) string { return `Basic realm="pullsecret-registry"` }},
		{"token ping", []Option{WithTokenAuth(testUsers)}, "/v2/", 401,
			func(r *Registry) string {
				return `Bearer realm="` + r.URL() + `/token",service="` + r.Addr() + `"`
			}},
		{"token manifest", []Option{WithTokenAuth(testUsers)}, "/v2/t/app/manifests/v1", 401,
			func(r *Registry) string {
				return `Bearer realm="` + r.URL() + `/token",service="` + r.Addr() + `",scope="repository:t/app:pull"`
			}},
		{"token over TLS", []Option{WithTokenAuth(testUsers), WithTLS()}, "/v2/", 401,
			func(r *Registry) string {
				return `Bearer realm="https://` + r.Addr() + `/token",service="` + r.Addr() + `"`
			}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			r := start(t, c.opts...)
			resp, err := r.Client().Get(r.URL() + c.path)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			if resp.StatusCode != c.wantStatus {
				t.Fatalf("status %d, want %d", resp.StatusCode, c.wantStatus)
			}
			if got, want := resp.Header.Get("WWW-Authenticate"), c.wantAuth(r); got != want {
				t.Errorf("WWW-Authenticate = %q, want %q", got, want)
			}
			if c.wantStatus == 401 {
				if code := errorCodeOf(t, resp.Body); code != "UNAUTHORIZED" {
					t.Errorf("error code %q", code)
				}
			}
		})
	}
}

func errorCodeOf(t *testing.T, body io.Reader) string {
	t.Helper()
	var e struct {
		Errors []struct{ Code, Message string }
	}
	if err := json.NewDecoder(body).Decode(&e); err != nil {
		t.Fatalf("error body: %v", err)
	}
	if len(e.Errors) == 0 {
		t.Fatal("no errors in error body")
	}
	return e.Errors[0].Code
}

type tokenResponse struct {
	Token        string `json:"token"`
	AccessToken  string `json:"access_token"`
	RefreshToken string `json:"refresh_token"`
	ExpiresIn    int    `json:"expires_in"`
	IssuedAt     string `json:"issued_at"`
}

// TestTokenEndpoint exercises /token directly, and the registry's verification
// of what it issues.
func TestTokenEndpoint(t *testing.T) {
	t.Parallel()
	r := start(t, WithTokenAuth(testUsers), WithTokenTTL(time.Minute))
	if _, err := r.SeedRandom(t.Context(), "t/app", "v1"); err != nil {
		t.Fatal(err)
	}
	if _, err := r.SeedRandom(t.Context(), "t/other", "v1"); err != nil {
		t.Fatal(err)
	}
	c := r.Client()
	service := url.QueryEscape(r.Addr())

	get := func(t *testing.T, user, pass, query string) (*http.Response, tokenResponse) {
		t.Helper()
		req, _ := http.NewRequest("GET", r.URL()+"/token?"+query, nil)
		if user != "" {
			req.SetBasicAuth(user, pass)
		}
		return do(t, c, req)
	}
	post := func(t *testing.T, form url.Values) (*http.Response, tokenResponse) {
		t.Helper()
		req, _ := http.NewRequest("POST", r.URL()+"/token", strings.NewReader(form.Encode()))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		return do(t, c, req)
	}
	manifest := func(t *testing.T, repo, token string) *http.Response {
		t.Helper()
		req, _ := http.NewRequest("GET", r.URL()+"/v2/"+repo+"/manifests/v1", nil)
		req.Header.Set("Accept", "application/vnd.oci.image.manifest.v1+json")
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp
	}

	t.Run("GET without credentials", func(t *testing.T) {
		resp, _ := get(t, "", "", "service="+service+"&scope=repository:t/app:pull")
		if resp.StatusCode != 401 || !strings.HasPrefix(resp.Header.Get("WWW-Authenticate"), "Basic ") {
			t.Errorf("status %d, challenge %q", resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
		}
	})
	t.Run("GET wrong password", func(t *testing.T) {
		if resp, _ := get(t, "alice", "nope", "service="+service); resp.StatusCode != 401 {
			t.Errorf("status %d", resp.StatusCode)
		}
	})
	t.Run("GET unknown service", func(t *testing.T) {
		if resp, _ := get(t, "alice", "alice-pw", "service=elsewhere"); resp.StatusCode != 400 {
			t.Errorf("status %d", resp.StatusCode)
		}
	})
	t.Run("GET malformed scope", func(t *testing.T) {
		if resp, _ := get(t, "alice", "alice-pw", "scope=repository"); resp.StatusCode != 400 {
			t.Errorf("status %d", resp.StatusCode)
		}
	})
	t.Run("PUT", func(t *testing.T) {
		req, _ := http.NewRequest("PUT", r.URL()+"/token", nil)
		if resp, _ := do(t, c, req); resp.StatusCode != 405 {
			t.Errorf("status %d", resp.StatusCode)
		}
	})
	t.Run("GET token is scoped", func(t *testing.T) {
		resp, tok := get(t, "alice", "alice-pw", "service="+service+"&scope=repository:t/app:pull")
		if resp.StatusCode != 200 || tok.Token == "" || tok.AccessToken != tok.Token || tok.ExpiresIn != 60 {
			t.Fatalf("status %d, response %+v", resp.StatusCode, tok)
		}
		if tok.RefreshToken != "" {
			t.Error("refresh token without offline_token")
		}
		if _, err := time.Parse(time.RFC3339, tok.IssuedAt); err != nil {
			t.Errorf("issued_at: %v", err)
		}
		if resp := manifest(t, "t/app", tok.Token); resp.StatusCode != 200 {
			t.Errorf("manifest with token: status %d", resp.StatusCode)
		}
		resp = manifest(t, "t/other", tok.Token)
		if resp.StatusCode != 401 || !strings.Contains(resp.Header.Get("WWW-Authenticate"), `error="insufficient_scope"`) {
			t.Errorf("other repo: status %d, challenge %q", resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
		}
	})
	t.Run("GET several scopes", func(t *testing.T) {
		_, tok := get(t, "bob", "bob-pw", "scope=repository:t/app:pull&scope=repository:t/other:pull,push")
		for _, repo := range []string{"t/app", "t/other"} {
			if resp := manifest(t, repo, tok.Token); resp.StatusCode != 200 {
				t.Errorf("%s: status %d", repo, resp.StatusCode)
			}
		}
	})
	t.Run("forged token", func(t *testing.T) {
		// Same issuer, service and claims, another key: distribution must
		// only trust the key it was configured with.
		forger, err := newTokenIssuer(t.TempDir(), r.issuer.realm, r.issuer.service, r.users, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		forger.kid = r.issuer.kid
		tok, err := forger.sign("alice", []resourceActions{{Type: "repository", Name: "t/app", Actions: []string{"pull"}}}, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		// distribution finds the key by kid, then the signature check
		// fails; that error is not ErrInvalidToken, so the challenge has
		// no error="invalid_token" parameter, just the 401.
		if resp := manifest(t, "t/app", tok); resp.StatusCode != 401 {
			t.Errorf("status %d", resp.StatusCode)
		}
		// A kid distribution does not know is refused too.
		forger.kid = "unknown"
		tok, err = forger.sign("alice", []resourceActions{{Type: "repository", Name: "t/app", Actions: []string{"pull"}}}, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		resp := manifest(t, "t/app", tok)
		if resp.StatusCode != 401 || !strings.Contains(resp.Header.Get("WWW-Authenticate"), `error="invalid_token"`) {
			t.Errorf("unknown kid: status %d, challenge %q", resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
		}
	})
	t.Run("expired token", func(t *testing.T) {
		tok, err := r.issuer.sign("alice", []resourceActions{{Type: "repository", Name: "t/app", Actions: []string{"pull"}}},
			time.Now().Add(-time.Hour))
		if err != nil {
			t.Fatal(err)
		}
		if resp := manifest(t, "t/app", tok); resp.StatusCode != 401 {
			t.Errorf("status %d", resp.StatusCode)
		}
	})
	t.Run("POST password and refresh grants", func(t *testing.T) {
		resp, tok := post(t, url.Values{
			"grant_type": {"password"}, "username": {"bob"}, "password": {"bob-pw"},
			"service": {r.Addr()}, "scope": {"repository:t/app:pull"}, "client_id": {"test"},
			"access_type": {"offline"},
		})
		if resp.StatusCode != 200 || tok.Token == "" || tok.RefreshToken == "" {
			t.Fatalf("status %d, response %+v", resp.StatusCode, tok)
		}
		refresh := url.Values{
			"grant_type": {"refresh_token"}, "refresh_token": {tok.RefreshToken},
			"service": {r.Addr()}, "scope": {"repository:t/other:pull repository:t/app:pull"}, "client_id": {"test"},
		}
		resp, tok2 := post(t, refresh)
		if resp.StatusCode != 200 || tok2.Token == "" {
			t.Fatalf("refresh: status %d, response %+v", resp.StatusCode, tok2)
		}
		if resp := manifest(t, "t/other", tok2.Token); resp.StatusCode != 200 {
			t.Errorf("token from refresh: status %d", resp.StatusCode)
		}
		// A password change revokes the refresh tokens issued before it.
		if err := r.SetPassword("bob", "bob-pw-2"); err != nil {
			t.Fatal(err)
		}
		if resp, _ := post(t, refresh); resp.StatusCode != 401 {
			t.Errorf("refresh after password change: status %d", resp.StatusCode)
		}
	})
	t.Run("POST bad grants", func(t *testing.T) {
		for _, form := range []url.Values{
			{"grant_type": {"password"}, "username": {"alice"}, "password": {"wrong"}},
			{"grant_type": {"refresh_token"}, "refresh_token": {"made-up"}},
			{"grant_type": {"refresh_token"}},
		} {
			if resp, _ := post(t, form); resp.StatusCode != 401 {
				t.Errorf("%v: status %d", form, resp.StatusCode)
			}
		}
		if resp, _ := post(t, url.Values{"grant_type": {"client_credentials"}}); resp.StatusCode != 400 {
			t.Errorf("unsupported grant: status %d", resp.StatusCode)
		}
	})
}

func do(t *testing.T, c *http.Client, req *http.Request) (*http.Response, tokenResponse) {
	t.Helper()
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var tok tokenResponse
	if resp.StatusCode == 200 {
		if err := json.NewDecoder(resp.Body).Decode(&tok); err != nil {
			t.Fatal(err)
		}
	}
	return resp, tok
}

// TestSetPassword changes credentials at runtime, as "password changed
// upstream" tests will, including several changes within one clock tick of
// the htpasswd file's mtime.
func TestSetPassword(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{"htpasswd", "token"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			opt := WithHTPasswd(map[string]string{"alice": "old"})
			if mode == "token" {
				opt = WithTokenAuth(map[string]string{"alice": "old"})
			}
			r := start(t, opt)
			if _, err := r.SeedRandom(t.Context(), "t/app", "v1"); err != nil {
				t.Fatal(err)
			}
			ref := r.Ref("t/app", "v1")
			check := func(user, pass string, wantOK bool) {
				t.Helper()
				_, err := pull(r, ref, &authn.Basic{Username: user, Password: pass})
				if wantOK && err != nil {
					t.Errorf("%s/%s: %v", user, pass, err)
				}
				if !wantOK && statusOf(err) != 401 {
					t.Errorf("%s/%s: err %v, want 401", user, pass, err)
				}
			}
			check("alice", "old", true)

			for _, p := range []string{"new1", "new2", "new3"} { // back to back
				if err := r.SetPassword("alice", p); err != nil {
					t.Fatal(err)
				}
			}
			check("alice", "old", false)
			check("alice", "new2", false)
			check("alice", "new3", true)

			if err := r.SetPassword("dave", "dave-pw"); err != nil {
				t.Fatal(err)
			}
			check("dave", "dave-pw", true)
			if err := r.DeleteUser("dave"); err != nil {
				t.Fatal(err)
			}
			check("dave", "dave-pw", false)
			if err := r.DeleteUser("dave"); err == nil {
				t.Error("deleting a missing user succeeded")
			}
			if err := r.SetPassword(seedUser, "x"); err == nil {
				t.Error("changing the seed user succeeded")
			}
			// Seeding still works after all that.
			if _, err := r.SeedRandom(t.Context(), "t/app", "v2"); err != nil {
				t.Errorf("seed after changes: %v", err)
			}
		})
	}
	t.Run("without auth", func(t *testing.T) {
		t.Parallel()
		r := start(t)
		if err := r.SetPassword("alice", "x"); err == nil {
			t.Error("SetPassword without auth succeeded")
		}
		if err := r.DeleteUser("alice"); err == nil {
			t.Error("DeleteUser without auth succeeded")
		}
	})
}
