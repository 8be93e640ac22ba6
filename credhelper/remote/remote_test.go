package remote_test

import (
	"bytes"
	"context"
	"encoding/pem"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/docker/docker-credential-helpers/credentials"
	"github.com/pullsecret/pullsecret/credhelper/remote"
	"github.com/pullsecret/pullsecret/proxy"
	"github.com/pullsecret/pullsecret/secret"
)

const remoteCanary = "canary-pw-remote-5b2d"

// remoteServer is a real pullsecret credential API over a sealed store
// holding a canary secret.
type remoteServer struct {
	srv     *httptest.Server
	tokens  *proxy.TokenStore
	creds   string // a token with the credentials scope
	pull    string // a pull-only token
	revoked string
}

func newRemoteServer(t *testing.T) *remoteServer {
	t.Helper()
	home := t.TempDir()
	store, err := secret.Open(home)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, err := store.Create(ctx, secret.Secret{Project: "acme", Name: "ghcr", Kind: secret.Basic, Registries: []secret.Pattern{"ghcr.io/acme"}},
		secret.Value{Username: "acme-bot", Password: remoteCanary}); err != nil {
		t.Fatal(err)
	}
	if _, err := store.Create(ctx, secret.Secret{Project: "acme", Name: "hub", Kind: secret.Token, Registries: []secret.Pattern{"docker.io"}},
		secret.Value{IdentityToken: remoteCanary + "-id"}); err != nil {
		t.Fatal(err)
	}
	tokens, err := proxy.NewTokenStore(home)
	if err != nil {
		t.Fatal(err)
	}
	signer, err := proxy.LoadSigner(home)
	if err != nil {
		t.Fatal(err)
	}
	auth := proxy.NewAuth(tokens, signer)
	mux := http.NewServeMux()
	mux.Handle(proxy.CredentialAPIPath, proxy.NewCredentialAPI(auth, store))
	mux.Handle("/token", auth.TokenHandler())
	rs := &remoteServer{srv: httptest.NewServer(mux), tokens: tokens}
	t.Cleanup(rs.srv.Close)
	mk := func(scopes ...string) (string, proxy.TokenInfo) {
		tok, info, err := tokens.Create(ctx, proxy.TokenSpec{Project: "acme", Scopes: scopes})
		if err != nil {
			t.Fatal(err)
		}
		return tok, info
	}
	rs.creds, _ = mk("credentials")
	rs.pull, _ = mk("pull")
	var info proxy.TokenInfo
	rs.revoked, info = mk("credentials")
	if _, err := tokens.Revoke(ctx, info.ID); err != nil {
		t.Fatal(err)
	}
	return rs
}

// helperRun runs one helper verb the way the binary does and returns what
// it printed and whether it failed.
func helperRun(h credentials.Helper, verb, stdin string) (string, error) {
	var out bytes.Buffer
	err := credentials.HandleCommand(h, verb, strings.NewReader(stdin), &out)
	if err != nil {
		// Serve prints the error on stdout and exits 1.
		return err.Error(), err
	}
	return out.String(), nil
}

func TestRemoteGet(t *testing.T) {
	t.Parallel()
	rs := newRemoteServer(t)
	proxyHost := strings.TrimPrefix(rs.srv.URL, "http://")
	env := func(tok string) func(string) string {
		return func(k string) string {
			return map[string]string{remote.EnvServer: rs.srv.URL, remote.EnvToken: tok}[k]
		}
	}
	creds, err := remote.FromEnv(env(rs.creds))
	if err != nil {
		t.Fatal(err)
	}
	pull, _ := remote.FromEnv(env(rs.pull))
	revoked, _ := remote.FromEnv(env(rs.revoked))
	last := "a"
	if strings.HasSuffix(rs.creds, "a") {
		last = "b"
	}
	wrong, _ := remote.FromEnv(env(rs.creds[:len(rs.creds)-1] + last))

	cases := []struct {
		name    string
		h       credentials.Helper
		in      string
		ok      bool
		want    string
		notWant string
	}{
		{"basic secret", creds, "ghcr.io/acme/app", true, `"Username":"acme-bot","Secret":"` + remoteCanary + `"`, ""},
		{"docker CLI form", creds, "https://index.docker.io/v1/", true, `"Username":"\u003ctoken\u003e","Secret":"` + remoteCanary + `-id"`, ""},
		{"not found is the protocol's not-found", creds, "quay.io", false, "credentials not found in native keychain", ""},
		{"outside the prefix", creds, "ghcr.io/someone/app", false, "credentials not found in native keychain", ""},
		{"the proxy itself: project token as identity token", pull, proxyHost, true, `"Username":"\u003ctoken\u003e","Secret":"` + rs.pull + `"`, ""},
		{"the proxy with a repository path", pull, proxyHost + "/ghcr.io/acme/app", true, `"Secret":"` + rs.pull + `"`, ""},
		{"pull token lacks credentials scope", pull, "ghcr.io/acme/app", false, "denied the request (this project token lacks the credentials scope", remoteCanary},
		{"revoked", revoked, "ghcr.io/acme/app", false, "refused the project token (the project token was revoked)", remoteCanary},
		{"wrong token", wrong, "ghcr.io/acme/app", false, "refused the project token (invalid credentials)", remoteCanary},
		{"bad server URL", creds, "ftp://x", false, "pullsecret: ", remoteCanary},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			out, err := helperRun(c.h, "get", c.in)
			if (err == nil) != c.ok || !strings.Contains(out, c.want) || (c.notWant != "" && strings.Contains(out, c.notWant)) {
				t.Fatalf("get %s: %q (err %v)", c.in, out, err)
			}
			if !c.ok {
				for _, tok := range []string{rs.creds, rs.pull, rs.revoked} {
					if strings.Contains(out, tok) {
						t.Fatal("an error quotes the token")
					}
				}
			}
		})
	}
	if err := credentials.HandleCommand(creds, "get", strings.NewReader("quay.io"), &bytes.Buffer{}); !credentials.IsErrCredentialsNotFound(err) {
		t.Fatalf("404 is not the protocol's not-found: %v", err)
	}
	// store and erase are refused clearly; list is empty.
	for _, verb := range []string{"store", "erase"} {
		in := "ghcr.io"
		if verb == "store" {
			in = `{"ServerURL":"ghcr.io","Username":"u","Secret":"` + remoteCanary + `"}`
		}
		out, err := helperRun(creds, verb, in)
		if err == nil || !strings.Contains(out, "not supported in remote mode") || strings.Contains(out, remoteCanary) {
			t.Fatalf("%s: %q %v", verb, out, err)
		}
	}
	if out, err := helperRun(creds, "list", ""); err != nil || strings.TrimSpace(out) != "{}" {
		t.Fatalf("list: %q %v", out, err)
	}
}

func TestRemoteServerDown(t *testing.T) {
	t.Parallel()
	// A port nothing listens on.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	h, err := remote.New("http://"+addr, "pst_0123456789abcdef_"+strings.Repeat("a", 52))
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	out, err := helperRun(h, "get", "ghcr.io/acme/app")
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("server down took %s", d)
	}
	want := "pullsecret: server http://" + addr + " unreachable: connection refused"
	if err == nil || out != want {
		t.Fatalf("server down: %q, want %q", out, want)
	}
}

func TestRemoteServerHangs(t *testing.T) {
	t.Parallel()
	// A server that accepts and never answers.
	release := make(chan struct{})
	var once sync.Once
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		<-release
	}))
	t.Cleanup(func() { once.Do(func() { close(release) }); srv.Close() })
	h, err := remote.New(srv.URL, "pst_0123456789abcdef_"+strings.Repeat("a", 52), remote.WithTimeout(time.Second))
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	out, err := helperRun(h, "get", "ghcr.io")
	d := time.Since(start)
	once.Do(func() { close(release) })
	if d > 3*time.Second || d < 900*time.Millisecond {
		t.Fatalf("hanging server: returned after %s", d)
	}
	if err == nil || !strings.Contains(out, "unreachable: no answer within 1s") {
		t.Fatalf("hanging server: %q", out)
	}
}

func TestRemoteFromEnv(t *testing.T) {
	t.Parallel()
	rs := newRemoteServer(t)
	dir := t.TempDir()
	file := filepath.Join(dir, "token")
	if err := os.WriteFile(file, []byte(rs.creds+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	getenv := func(m map[string]string) func(string) string { return func(k string) string { return m[k] } }
	h, err := remote.FromEnv(getenv(map[string]string{remote.EnvServer: rs.srv.URL + "/", remote.EnvTokenFile: file}))
	if err != nil {
		t.Fatal(err)
	}
	if out, err := helperRun(h, "get", "ghcr.io/acme/app"); err != nil || !strings.Contains(out, remoteCanary) {
		t.Fatalf("token file: %q %v", out, err)
	}
	if !remote.Configured(getenv(map[string]string{remote.EnvServer: "x"})) || remote.Configured(getenv(nil)) {
		t.Fatal("Configured")
	}
	bad := []struct {
		env  map[string]string
		want string
	}{
		{map[string]string{remote.EnvServer: rs.srv.URL}, "neither PULLSECRET_TOKEN nor PULLSECRET_TOKEN_FILE"},
		{map[string]string{remote.EnvServer: rs.srv.URL, remote.EnvTokenFile: filepath.Join(dir, "missing")}, "PULLSECRET_TOKEN_FILE"},
		{map[string]string{remote.EnvServer: "ftp://x", remote.EnvToken: rs.creds}, "want http(s)://HOST[:PORT]"},
		{map[string]string{remote.EnvServer: "https://u:p@x", remote.EnvToken: rs.creds}, "no user info"},
		{map[string]string{remote.EnvServer: rs.srv.URL, remote.EnvToken: "a b"}, "malformed"},
		{map[string]string{remote.EnvServer: rs.srv.URL, remote.EnvToken: rs.creds, remote.EnvCAFile: file}, "no PEM certificate"},
	}
	for _, b := range bad {
		_, err := remote.FromEnv(getenv(b.env))
		if err == nil || !strings.Contains(err.Error(), b.want) || strings.Contains(err.Error(), rs.creds) {
			t.Errorf("%v: %v, want %q", b.env, err, b.want)
		}
	}
	// No scheme means https.
	h, err = remote.New("pullsecret.internal:5000", rs.creds)
	if err != nil || h.Server() != "https://pullsecret.internal:5000" {
		t.Fatalf("schemeless server: %v %v", h, err)
	}
}

func TestRemoteTLSAndRedirect(t *testing.T) {
	t.Parallel()
	// A TLS server is trusted through PULLSECRET_CA_FILE.
	rs := newRemoteServer(t)
	tlsSrv := httptest.NewTLSServer(rs.srv.Config.Handler)
	t.Cleanup(tlsSrv.Close)
	ca := filepath.Join(t.TempDir(), "ca.pem")
	writePEM(t, ca, tlsSrv.Certificate().Raw)
	h, err := remote.FromEnv(func(k string) string {
		return map[string]string{remote.EnvServer: tlsSrv.URL, remote.EnvToken: rs.creds, remote.EnvCAFile: ca}[k]
	})
	if err != nil {
		t.Fatal(err)
	}
	if out, err := helperRun(h, "get", "ghcr.io/acme/app"); err != nil || !strings.Contains(out, remoteCanary) {
		t.Fatalf("TLS: %q %v", out, err)
	}
	// Without the CA: a clear error, fast.
	h2, _ := remote.New(tlsSrv.URL, rs.creds)
	if out, err := helperRun(h2, "get", "ghcr.io"); err == nil || !strings.Contains(out, "unreachable") || !strings.Contains(out, "certificate") {
		t.Fatalf("untrusted TLS: %q", out)
	}
	// A 404 from something that is not the credential API is an error,
	// not "no credential".
	h4, _ := remote.New(rs.srv.URL+"/wrong-prefix", rs.creds)
	if out, err := helperRun(h4, "get", "ghcr.io"); err == nil || strings.Contains(out, "credentials not found") || !strings.Contains(out, "no credential API") {
		t.Fatalf("404 from elsewhere: %q", out)
	}
	// The token never follows a redirect.
	var leaked sync.Once
	var sawToken bool
	other := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "" {
			leaked.Do(func() { sawToken = true })
		}
	}))
	t.Cleanup(other.Close)
	redir := httptest.NewServer(http.RedirectHandler(other.URL+"/api/v1/credentials", http.StatusTemporaryRedirect))
	t.Cleanup(redir.Close)
	h3, _ := remote.New(redir.URL, rs.creds)
	out, err := helperRun(h3, "get", "ghcr.io")
	if err == nil || !strings.Contains(out, "307") || sawToken {
		t.Fatalf("redirect: %q, token sent on: %v", out, sawToken)
	}
}

func writePEM(t *testing.T, path string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}
