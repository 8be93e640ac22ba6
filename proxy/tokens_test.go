package proxy

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"go/ast"
	"go/parser"
	"go/token"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// tokClock is a settable clock shared by a test's stores and servers.
type tokClock struct {
	mu   sync.Mutex
	t    time.Time
	real bool // follow the wall clock (for real clients)
}

func newTokClock() *tokClock {
	return &tokClock{t: time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)}
}

func (c *tokClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.real {
		return time.Now()
	}
	return c.t
}

func (c *tokClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// syncBuffer collects log output from concurrent handlers.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// authFixture is a data folder with a token store, a signer and an Auth
// over them, logging to a buffer.
type authFixture struct {
	t      *testing.T
	home   string
	clock  *tokClock
	tokens *TokenStore
	signer *Signer
	auth   *Auth
	logs   *syncBuffer
}

func newAuthFixture(t *testing.T, opts ...AuthOption) *authFixture {
	t.Helper()
	f := &authFixture{t: t, home: t.TempDir(), clock: newTokClock(), logs: &syncBuffer{}}
	var err error
	if f.tokens, err = NewTokenStore(f.home, WithTokenClock(f.clock.Now)); err != nil {
		t.Fatal(err)
	}
	if f.signer, err = LoadSigner(f.home); err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(f.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	base := []AuthOption{WithAuthClock(f.clock.Now), WithAuthLogger(log)}
	f.auth = NewAuth(f.tokens, f.signer, append(base, opts...)...)
	return f
}

func (f *authFixture) create(spec TokenSpec) (string, TokenInfo) {
	f.t.Helper()
	tok, info, err := f.tokens.Create(context.Background(), spec)
	if err != nil {
		f.t.Fatalf("create token: %v", err)
	}
	return tok, info
}

// otherStore is a second store on the same folder, as the CLI of another
// process would open it.
func (f *authFixture) otherStore() *TokenStore {
	f.t.Helper()
	s, err := NewTokenStore(f.home, WithTokenClock(f.clock.Now))
	if err != nil {
		f.t.Fatal(err)
	}
	return s
}

// wrongToken is tok with its last character changed: same id, wrong
// secret.
func wrongToken(tok string) string {
	if strings.HasSuffix(tok, "a") {
		return tok[:len(tok)-1] + "b"
	}
	return tok[:len(tok)-1] + "a"
}

func TestTokenCreateVerifyListRevokeExpire(t *testing.T) {
	t.Parallel()
	f := newAuthFixture(t)
	ctx := context.Background()
	tok, info := f.create(TokenSpec{Project: "acme", Name: "ci", Scopes: []string{"push"}, Repositories: []string{"GHCR.io/acme/*"}, TTL: time.Hour})

	id, ok := ParseTokenID(tok)
	if !ok || id != info.ID {
		t.Fatalf("token id %q ok=%v, info id %q", id, ok, info.ID)
	}
	if got := strings.Join(info.Scopes, ","); got != "pull,push" {
		t.Errorf("scopes = %s, want pull,push (push brings pull)", got)
	}
	if got := strings.Join(info.Repositories, ","); got != "ghcr.io/acme/*" {
		t.Errorf("repositories = %s", got)
	}
	if !info.Expires.Equal(f.clock.Now().Add(time.Hour)) {
		t.Errorf("expires = %s", info.Expires)
	}
	if _, err := f.tokens.Verify(ctx, tok); err != nil {
		t.Fatalf("verify: %v", err)
	}

	// Defaults: pull only, default lifetime, project "default".
	_, def := f.create(TokenSpec{})
	if def.Project != "default" || strings.Join(def.Scopes, ",") != "pull" || !def.Expires.Equal(f.clock.Now().Add(DefaultProjectTokenTTL)) {
		t.Errorf("defaults: %+v", def)
	}

	list, err := f.tokens.List(ctx, "acme")
	if err != nil || len(list) != 1 || list[0].ID != info.ID || list[0].Name != "ci" {
		t.Fatalf("list acme = %+v, %v", list, err)
	}
	all, _ := f.tokens.List(ctx, "")
	if len(all) != 2 {
		t.Fatalf("list all = %d tokens", len(all))
	}

	// Expiry.
	f.clock.Advance(time.Hour)
	if _, err := f.tokens.Verify(ctx, tok); !errors.Is(err, ErrTokenExpired) {
		t.Fatalf("verify after expiry: %v, want ErrTokenExpired", err)
	}
	if s := list[0].Status(f.clock.Now()); s != "expired" {
		t.Errorf("status = %s", s)
	}
	f.clock.Advance(-time.Minute)

	// Revocation.
	rev, err := f.tokens.Revoke(ctx, info.ID)
	if err != nil || rev.Revoked == nil {
		t.Fatalf("revoke: %+v %v", rev, err)
	}
	if _, err := f.tokens.Verify(ctx, tok); !errors.Is(err, ErrTokenRevoked) {
		t.Fatalf("verify after revoke: %v, want ErrTokenRevoked", err)
	}
	first := *rev.Revoked
	f.clock.Advance(time.Second)
	again, err := f.tokens.Revoke(ctx, info.ID)
	if err != nil || !again.Revoked.Equal(first) {
		t.Errorf("second revoke changed the time: %v %v", again.Revoked, err)
	}
	if _, err := f.tokens.Revoke(ctx, "0123456789abcdef"); !errors.Is(err, ErrTokenNotFound) {
		t.Errorf("revoke unknown: %v", err)
	}
}

func TestTokenVerifyRejects(t *testing.T) {
	t.Parallel()
	f := newAuthFixture(t)
	tok, _ := f.create(TokenSpec{Project: "acme"})
	other, _ := f.create(TokenSpec{Project: "acme"})
	sec := tok[len(tok)-tokenSecretLen:]
	otherID, _ := ParseTokenID(other)
	flip := wrongToken(tok)
	cases := map[string]string{
		"empty":               "",
		"garbage":             "hello",
		"no prefix":           tok[len(TokenPrefix):],
		"wrong secret":        flip,
		"secret of other id":  TokenPrefix + otherID + "_" + sec,
		"unknown id":          TokenPrefix + "0123456789abcdef_" + sec,
		"upper case":          strings.ToUpper(tok),
		"trailing space":      tok + " ",
		"truncated":           tok[:len(tok)-1],
		"jwt-like":            "eyJhbGciOiJub25lIn0.e30.",
		"id with non-hex":     TokenPrefix + "0123456789abcdeg_" + sec,
		"secret bad alphabet": tok[:len(tok)-1] + "1",
	}
	for name, in := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := f.tokens.Verify(context.Background(), in)
			if !errors.Is(err, ErrInvalidToken) {
				t.Fatalf("Verify(%s) = %v, want ErrInvalidToken", name, err)
			}
			if strings.Contains(err.Error(), sec) || (in != "" && strings.Contains(err.Error(), in)) {
				t.Fatalf("error quotes the credential: %v", err)
			}
		})
	}
}

func TestTokenHashesOnlyAtRest(t *testing.T) {
	t.Parallel()
	f := newAuthFixture(t)
	var toks []string
	for i := range 5 {
		tok, _ := f.create(TokenSpec{Project: "acme", Name: "n" + string(rune('a'+i)), Scopes: []string{"credentials"}})
		toks = append(toks, tok)
	}
	path := filepath.Join(f.home, tokensFile)
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("token file mode %v, want 0600", fi.Mode().Perm())
	}
	// Every file of the folder, the lock and the signing key included.
	var all []byte
	entries, _ := os.ReadDir(f.home)
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(f.home, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		all = append(all, b...)
	}
	data, _ := os.ReadFile(path)
	for _, tok := range toks {
		sec := tok[len(tok)-tokenSecretLen:]
		if bytes.Contains(all, []byte(sec)) {
			t.Fatalf("a token's secret is stored in clear in %s", f.home)
		}
		sum := sha256.Sum256([]byte(tok))
		if !bytes.Contains(data, []byte(base64.StdEncoding.EncodeToString(sum[:]))) {
			t.Errorf("the token's SHA-256 is not in the file")
		}
	}
	if len(toks) != 5 {
		t.Fatal("tokens lost")
	}
}

// TestTokenComparisonIsConstantTime checks in the source that the stored
// hash is compared with crypto/subtle and nowhere with == or bytes.Equal.
func TestTokenComparisonIsConstantTime(t *testing.T) {
	t.Parallel()
	fset := token.NewFileSet()
	file, err := parser.ParseFile(fset, "tokens.go", nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	funcs := map[string]*ast.FuncDecl{}
	for _, d := range file.Decls {
		if fd, ok := d.(*ast.FuncDecl); ok {
			funcs[fd.Name.Name] = fd
		}
	}
	calls := func(fd *ast.FuncDecl, pkg, name string) bool {
		found := false
		ast.Inspect(fd, func(n ast.Node) bool {
			if ce, ok := n.(*ast.CallExpr); ok {
				switch fn := ce.Fun.(type) {
				case *ast.SelectorExpr:
					if id, ok := fn.X.(*ast.Ident); ok && id.Name == pkg && fn.Sel.Name == name {
						found = true
					}
				case *ast.Ident:
					if pkg == "" && fn.Name == name {
						found = true
					}
				}
			}
			return true
		})
		return found
	}
	if fd := funcs["hashEqual"]; fd == nil || !calls(fd, "subtle", "ConstantTimeCompare") {
		t.Fatal("hashEqual does not use subtle.ConstantTimeCompare")
	}
	if fd := funcs["verify"]; fd == nil || !calls(fd, "", "hashEqual") {
		t.Fatal("verify does not compare hashes with hashEqual")
	}
	ast.Inspect(file, func(n ast.Node) bool {
		switch x := n.(type) {
		case *ast.BinaryExpr:
			for _, side := range []ast.Expr{x.X, x.Y} {
				if se, ok := side.(*ast.SelectorExpr); ok && se.Sel.Name == "Hash" && (x.Op == token.EQL || x.Op == token.NEQ) {
					t.Errorf("%s: Hash compared with %s", fset.Position(x.Pos()), x.Op)
				}
			}
		case *ast.CallExpr:
			if se, ok := x.Fun.(*ast.SelectorExpr); ok {
				if id, ok := se.X.(*ast.Ident); ok && id.Name == "bytes" && se.Sel.Name == "Equal" {
					t.Errorf("%s: bytes.Equal used in tokens.go", fset.Position(x.Pos()))
				}
			}
		}
		return true
	})
}

func TestTokenRevocationSeenByRunningStore(t *testing.T) {
	t.Parallel()
	f := newAuthFixture(t)
	ctx := context.Background()
	tok, info := f.create(TokenSpec{Project: "acme"})
	// The server's store has the file cached.
	for range 3 {
		if _, err := f.tokens.Verify(ctx, tok); err != nil {
			t.Fatal(err)
		}
	}
	// Another process (the CLI) revokes.
	if _, err := f.otherStore().Revoke(ctx, info.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := f.tokens.Verify(ctx, tok); !errors.Is(err, ErrTokenRevoked) {
		t.Fatalf("running store after revoke by another: %v, want ErrTokenRevoked", err)
	}
	// And a token created elsewhere is seen at once too.
	tok2, _, err := f.otherStore().Create(ctx, TokenSpec{Project: "acme"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.tokens.Verify(ctx, tok2); err != nil {
		t.Fatalf("token created by another store: %v", err)
	}
}

func TestTokenConcurrentCreatesAcrossStores(t *testing.T) {
	t.Parallel()
	f := newAuthFixture(t)
	ctx := context.Background()
	var wg sync.WaitGroup
	toks := make([]string, 24)
	for i := range toks {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s := f.tokens
			if i%2 == 1 {
				s = f.otherStore()
			}
			tok, _, err := s.Create(ctx, TokenSpec{Project: "acme"})
			if err != nil {
				t.Error(err)
			}
			toks[i] = tok
		}()
	}
	wg.Wait()
	list, err := f.tokens.List(ctx, "acme")
	if err != nil || len(list) != len(toks) {
		t.Fatalf("list = %d tokens, %v; want %d (an update was lost)", len(list), err, len(toks))
	}
	for _, tok := range toks {
		if _, err := f.tokens.Verify(ctx, tok); err != nil {
			t.Fatal(err)
		}
	}
	if m, _ := filepath.Glob(filepath.Join(f.home, ".tokens.json.tmp-*")); len(m) > 0 {
		t.Errorf("temporary files left: %v", m)
	}
}

func TestTokenSpecValidation(t *testing.T) {
	t.Parallel()
	f := newAuthFixture(t)
	cases := []struct {
		name string
		spec TokenSpec
		want string
	}{
		{"bad project", TokenSpec{Project: "Acme"}, "project"},
		{"bad scope", TokenSpec{Scopes: []string{"admin"}}, "unknown scope"},
		{"bad name", TokenSpec{Name: "a b"}, "invalid token name"},
		{"long name", TokenSpec{Name: strings.Repeat("a", 64)}, "invalid token name"},
		{"bad pattern", TokenSpec{Repositories: []string{"ghcr.io/a*"}}, "invalid repository pattern"},
		{"scheme pattern", TokenSpec{Repositories: []string{"https://ghcr.io/acme"}}, "invalid repository pattern"},
		{"negative ttl", TokenSpec{TTL: -time.Hour}, "positive"},
		{"too long ttl", TokenSpec{TTL: MaxProjectTokenTTL + time.Hour}, "longer than the maximum"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, _, err := f.tokens.Create(context.Background(), c.spec)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("Create(%+v) = %v, want error containing %q", c.spec, err, c.want)
			}
		})
	}
	list, _ := f.tokens.List(context.Background(), "")
	if len(list) != 0 {
		t.Errorf("invalid specs created %d tokens", len(list))
	}
}

func TestNormalizeScopes(t *testing.T) {
	t.Parallel()
	cases := []struct {
		in   []string
		want string
	}{
		{nil, "pull"},
		{[]string{"pull"}, "pull"},
		{[]string{"push"}, "pull,push"},
		{[]string{"credentials"}, "credentials"},
		{[]string{"credentials,pull", "pull"}, "pull,credentials"},
		{[]string{"credentials", "push", "pull"}, "pull,push,credentials"},
		{[]string{"pull,"}, "!"},
		{[]string{"PULL"}, "!"},
	}
	for _, c := range cases {
		got, err := NormalizeScopes(c.in)
		if c.want == "!" {
			if err == nil {
				t.Errorf("NormalizeScopes(%q) = %v, want error", c.in, got)
			}
			continue
		}
		if err != nil || strings.Join(got, ",") != c.want {
			t.Errorf("NormalizeScopes(%q) = %v, %v; want %s", c.in, got, err, c.want)
		}
	}
}

func TestRepositoryPatterns(t *testing.T) {
	t.Parallel()
	valid := map[string]string{
		"ghcr.io":                            "ghcr.io",
		"GHCR.IO/acme":                       "ghcr.io/acme",
		"ghcr.io/acme/":                      "ghcr.io/acme",
		"ghcr.io/acme/*":                     "ghcr.io/acme/*",
		"ghcr.io/*":                          "ghcr.io",
		"index.docker.io/library":            "docker.io/library",
		"registry.example.com:5000/team/app": "registry.example.com:5000/team/app",
		"[::1]:5000/x":                       "[::1]:5000/x",
	}
	for in, want := range valid {
		got, err := ValidateRepositoryPattern(in)
		if err != nil || got != want {
			t.Errorf("ValidateRepositoryPattern(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{"", "*", "ghcr.io/a*", "ghcr.io/*/app", "https://ghcr.io", "ghcr.io/v2/acme", "ghcr.io/Acme", "user@ghcr.io", "ghcr.io/acme?x", "ghcr.io/acme/**", "ghcr.io:0"} {
		if got, err := ValidateRepositoryPattern(in); err == nil {
			t.Errorf("ValidateRepositoryPattern(%q) = %q, want error", in, got)
		}
	}
	match := []struct {
		pattern, name string
		want          bool
	}{
		{"ghcr.io", "ghcr.io/acme/app", true},
		{"ghcr.io", "ghcr.io.evil.com/acme/app", false},
		{"ghcr.io/acme", "ghcr.io/acme", true},
		{"ghcr.io/acme", "ghcr.io/acme/app", true},
		{"ghcr.io/acme", "ghcr.io/acme-other/app", false},
		{"ghcr.io/acme", "ghcr.io/acmeapp", false},
		{"ghcr.io/acme/*", "ghcr.io/acme", false},
		{"ghcr.io/acme/*", "ghcr.io/acme/app", true},
		{"ghcr.io/acme/*", "ghcr.io/acme/team/app", true},
		{"ghcr.io/acme/app", "ghcr.io/acme/app", true},
		{"ghcr.io/acme/app", "ghcr.io/acme/app2", false},
		{"docker.io/library", "index.docker.io/library/alpine", true},
		{"ghcr.io/acme", "ghcr.io/v2/acme/app", false},
		{"ghcr.io/acme", "ghcr.io/acme/../other", false},
		{"ghcr.io/acme", "ghcr.io", false},
		{"ghcr.io/acme", "ghcr.io/acme/App", false},
		{"registry.example.com:5000", "registry.example.com/app", false},
		{"registry.example.com:5000", "registry.example.com:5000/app", true},
	}
	for _, m := range match {
		if got := MatchRepositoryPattern(m.pattern, m.name); got != m.want {
			t.Errorf("MatchRepositoryPattern(%q, %q) = %v, want %v", m.pattern, m.name, got, m.want)
		}
	}
}

func TestParseTokenID(t *testing.T) {
	t.Parallel()
	tok, id, err := newToken()
	if err != nil {
		t.Fatal(err)
	}
	if len(tok) != tokenLen || !strings.HasPrefix(tok, "pst_"+id+"_") {
		t.Fatalf("token shape %q", tok)
	}
	// 32 random bytes of secret: at least 256 bits.
	if raw, err := tokenB32.DecodeString(tok[len(tok)-tokenSecretLen:]); err != nil || len(raw) < 32 {
		t.Fatalf("secret decodes to %d bytes, %v", len(raw), err)
	}
	if got, ok := ParseTokenID(tok); !ok || got != id {
		t.Fatalf("ParseTokenID = %q %v", got, ok)
	}
	tok2, _, _ := newToken()
	if tok2 == tok {
		t.Fatal("two tokens are equal")
	}
}

func TestEphemeralTokensPruned(t *testing.T) {
	t.Parallel()
	f := newAuthFixture(t)
	ctx := context.Background()
	tok, exp, err := f.tokens.IssuePullToken(ctx, "acme", "ghcr.io/acme/app", 15*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	info, err := f.tokens.Verify(ctx, tok)
	if err != nil || !info.Ephemeral || !exp.Equal(info.Expires) || strings.Join(info.Scopes, ",") != "pull" || strings.Join(info.Repositories, ",") != "ghcr.io/acme/app" {
		t.Fatalf("issued pull token: %+v %v", info, err)
	}
	_, keep := f.create(TokenSpec{Project: "acme", TTL: time.Minute})
	f.clock.Advance(16 * time.Minute)
	f.create(TokenSpec{Project: "acme"}) // any write prunes
	list, _ := f.tokens.List(ctx, "acme")
	for _, l := range list {
		if l.ID == info.ID {
			t.Fatal("expired ephemeral token kept")
		}
	}
	if len(list) != 2 || list[0].ID != keep.ID {
		t.Fatalf("non-ephemeral expired token dropped: %+v", list)
	}
}

func TestTokenStoreDamagedFile(t *testing.T) {
	t.Parallel()
	home := t.TempDir()
	if err := os.WriteFile(filepath.Join(home, tokensFile), []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := NewTokenStore(home)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.Create(context.Background(), TokenSpec{}); err == nil || !strings.Contains(err.Error(), "damaged") {
		t.Fatalf("create on damaged file: %v", err)
	}
	if b, _ := os.ReadFile(filepath.Join(home, tokensFile)); string(b) != "{not json" {
		t.Fatal("damaged file was overwritten")
	}
}
