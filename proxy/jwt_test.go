package proxy

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
)

func TestLoadSignerCreatesAndReloads(t *testing.T) {
	t.Parallel()
	home := t.TempDir()
	s1, err := LoadSigner(home)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(filepath.Join(home, SigningKeysFile))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file: %v %v", fi, err)
	}
	s2, err := LoadSigner(home)
	if err != nil || s2.KeyID() != s1.KeyID() || s1.KeyID() == "" {
		t.Fatalf("reload: kid %q vs %q, %v", s2.KeyID(), s1.KeyID(), err)
	}
	for _, k := range s1.PublicKeys().Keys {
		if !k.IsPublic() {
			t.Fatal("PublicKeys holds a private key")
		}
	}
	other := t.TempDir()
	if err := os.WriteFile(filepath.Join(other, SigningKeysFile), []byte("nope"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadSigner(other); err == nil || !strings.Contains(err.Error(), "damaged") {
		t.Fatalf("damaged key file: %v", err)
	}
}

// jwtCase builds a token to present as "Bearer <token>".
type jwtCase struct {
	name string
	make func(t *testing.T, f *authFixture, good accessClaims) string
	want error
}

func b64(v any) string {
	b, _ := json.Marshal(v)
	return base64.RawURLEncoding.EncodeToString(b)
}

// signWith signs claims with key under header kid, optionally embedding a
// jwk.
func signWith(t *testing.T, alg jose.SignatureAlgorithm, key any, kid string, embed bool, claims any) string {
	t.Helper()
	opts := (&jose.SignerOptions{}).WithType("JWT")
	if kid != "" {
		opts = opts.WithHeader("kid", kid)
	}
	opts.EmbedJWK = embed
	sig, err := jose.NewSigner(jose.SigningKey{Algorithm: alg, Key: key}, opts)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := jwt.Signed(sig).Claims(claims).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func TestJWTRejected(t *testing.T) {
	t.Parallel()
	f := newAuthFixture(t)
	_, info := f.create(TokenSpec{Project: "acme", Scopes: []string{"push"}})
	now := f.clock.Now()
	good := accessClaims{
		Claims: jwt.Claims{Issuer: DefaultIssuer, Subject: info.ID, Audience: jwt.Audience{DefaultService},
			Expiry: jwt.NewNumericDate(now.Add(5 * time.Minute)), NotBefore: jwt.NewNumericDate(now), IssuedAt: jwt.NewNumericDate(now), ID: "x"},
		Project: "acme", Use: useAccess,
		Access: []Access{{Type: "repository", Name: "ghcr.io/acme/app", Actions: []string{"pull", "push"}}},
	}
	foreign, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	rsaKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	_, edKey, _ := ed25519.GenerateKey(rand.Reader)
	mod := func(fn func(c *accessClaims)) func(t *testing.T, f *authFixture, g accessClaims) string {
		return func(t *testing.T, f *authFixture, g accessClaims) string {
			fn(&g)
			s, err := f.signer.sign(g)
			if err != nil {
				t.Fatal(err)
			}
			return s
		}
	}
	cases := []jwtCase{
		{"tampered payload", func(t *testing.T, f *authFixture, g accessClaims) string {
			s, _ := f.signer.sign(g)
			parts := strings.Split(s, ".")
			g.Access = append(g.Access, Access{Type: "repository", Name: "ghcr.io/other/app", Actions: []string{"push"}})
			parts[1] = b64(g)
			return strings.Join(parts, ".")
		}, ErrInvalidToken},
		{"tampered signature", func(t *testing.T, f *authFixture, g accessClaims) string {
			s, _ := f.signer.sign(g)
			b := []byte(s)
			i := len(b) - 5
			if b[i] == 'A' {
				b[i] = 'B'
			} else {
				b[i] = 'A'
			}
			return string(b)
		}, ErrInvalidToken},
		{"alg none", func(t *testing.T, f *authFixture, g accessClaims) string {
			return b64(map[string]string{"alg": "none", "typ": "JWT", "kid": f.signer.KeyID()}) + "." + b64(g) + "."
		}, ErrInvalidToken},
		{"alg HS256 keyed with our public key", func(t *testing.T, f *authFixture, g accessClaims) string {
			pub, _ := x509.MarshalPKIXPublicKey(f.signer.pub[f.signer.KeyID()])
			h := b64(map[string]string{"alg": "HS256", "typ": "JWT", "kid": f.signer.KeyID()})
			p := b64(g)
			m := hmac.New(sha256.New, pub)
			m.Write([]byte(h + "." + p))
			return h + "." + p + "." + base64.RawURLEncoding.EncodeToString(m.Sum(nil))
		}, ErrInvalidToken},
		{"foreign key with our kid", func(t *testing.T, f *authFixture, g accessClaims) string {
			return signWith(t, jose.ES256, foreign, f.signer.KeyID(), false, g)
		}, ErrInvalidToken},
		{"foreign key embedded as jwk", func(t *testing.T, f *authFixture, g accessClaims) string {
			return signWith(t, jose.ES256, foreign, "", true, g)
		}, ErrInvalidToken},
		{"RS256 foreign key", func(t *testing.T, f *authFixture, g accessClaims) string {
			return signWith(t, jose.RS256, rsaKey, f.signer.KeyID(), false, g)
		}, ErrInvalidToken},
		{"EdDSA foreign key", func(t *testing.T, f *authFixture, g accessClaims) string {
			return signWith(t, jose.EdDSA, edKey, f.signer.KeyID(), false, g)
		}, ErrInvalidToken},
		{"other server's key", func(t *testing.T, f *authFixture, g accessClaims) string {
			other, err := LoadSigner(t.TempDir())
			if err != nil {
				t.Fatal(err)
			}
			s, _ := other.sign(g)
			return s
		}, ErrInvalidToken},
		{"expired", mod(func(c *accessClaims) {
			c.Expiry = jwt.NewNumericDate(now.Add(-time.Minute))
			c.IssuedAt = jwt.NewNumericDate(now.Add(-10 * time.Minute))
			c.NotBefore = c.IssuedAt
		}), ErrTokenExpired},
		{"not yet valid", mod(func(c *accessClaims) { c.NotBefore = jwt.NewNumericDate(now.Add(10 * time.Minute)) }), ErrInvalidToken},
		{"issued in the future", mod(func(c *accessClaims) { c.IssuedAt = jwt.NewNumericDate(now.Add(10 * time.Minute)) }), ErrInvalidToken},
		{"no exp", mod(func(c *accessClaims) { c.Expiry = nil }), ErrInvalidToken},
		{"no nbf", mod(func(c *accessClaims) { c.NotBefore = nil }), ErrInvalidToken},
		{"no jti", mod(func(c *accessClaims) { c.ID = "" }), ErrInvalidToken},
		{"wrong audience", mod(func(c *accessClaims) { c.Audience = jwt.Audience{"registry.docker.io"} }), ErrInvalidToken},
		{"wrong issuer", mod(func(c *accessClaims) { c.Issuer = "someone" }), ErrInvalidToken},
		{"unknown subject", mod(func(c *accessClaims) { c.Subject = "0123456789abcdef" }), ErrInvalidToken},
		{"bad subject", mod(func(c *accessClaims) { c.Subject = "../x" }), ErrInvalidToken},
		{"other project", mod(func(c *accessClaims) { c.Project = "other" }), ErrInvalidToken},
		{"refresh token used as access", mod(func(c *accessClaims) { c.Use = useRefresh }), ErrInvalidToken},
		{"garbage", func(*testing.T, *authFixture, accessClaims) string { return "a.b.c" }, ErrInvalidToken},
		{"huge", func(*testing.T, *authFixture, accessClaims) string { return strings.Repeat("a", 20000) }, ErrInvalidToken},
	}
	// The good token works.
	s, err := f.signer.sign(good)
	if err != nil {
		t.Fatal(err)
	}
	r := httptest.NewRequest("GET", "/v2/", nil)
	r.Header.Set("Authorization", "Bearer "+s)
	p, err := f.auth.Authenticate(r)
	if err != nil || p.Project != "acme" || p.TokenID != info.ID || len(p.Access) != 1 {
		t.Fatalf("good token: %+v %v", p, err)
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			raw := c.make(t, f, good)
			r := httptest.NewRequest("GET", "/v2/", nil)
			r.Header.Set("Authorization", "Bearer "+raw)
			p, err := f.auth.Authenticate(r)
			if !errors.Is(err, c.want) {
				t.Fatalf("Authenticate = %+v, %v; want %v", p, err, c.want)
			}
		})
	}
	// A refresh token is refused as an access token, and an access token
	// as a refresh token.
	resp, err := f.auth.issue(context.Background(), info, nil, true)
	if err != nil {
		t.Fatal(err)
	}
	r.Header.Set("Authorization", "Bearer "+resp.RefreshToken)
	if _, err := f.auth.Authenticate(r); !errors.Is(err, ErrInvalidToken) {
		t.Fatalf("refresh token as access: %v", err)
	}
	if _, err := f.auth.verifyRefresh(context.Background(), resp.Token); !errors.Is(err, ErrInvalidToken) {
		t.Fatalf("access token as refresh: %v", err)
	}
	if _, err := f.auth.verifyRefresh(context.Background(), resp.RefreshToken); err != nil {
		t.Fatalf("refresh token: %v", err)
	}
}

func TestJWTLeewayAndLifetime(t *testing.T) {
	t.Parallel()
	f := newAuthFixture(t, WithTokenTTL(2*time.Minute))
	_, info := f.create(TokenSpec{Project: "acme", TTL: time.Hour})
	resp, err := f.auth.issue(context.Background(), info, nil, false)
	if err != nil || resp.ExpiresIn != 120 {
		t.Fatalf("issue: %+v %v", resp, err)
	}
	check := func() error {
		r := httptest.NewRequest("GET", "/v2/", nil)
		r.Header.Set("Authorization", "Bearer "+resp.Token)
		_, err := f.auth.Authenticate(r)
		return err
	}
	f.clock.Advance(2*time.Minute + 20*time.Second) // within the leeway
	if err := check(); err != nil {
		t.Fatalf("within leeway: %v", err)
	}
	f.clock.Advance(time.Minute)
	if err := check(); !errors.Is(err, ErrTokenExpired) {
		t.Fatalf("after expiry: %v", err)
	}
	// A registry token never outlives its project token.
	_, short := f.create(TokenSpec{Project: "acme", TTL: 30 * time.Second})
	resp, _ = f.auth.issue(context.Background(), short, nil, true)
	if resp.ExpiresIn != 30 {
		t.Fatalf("expires_in = %d, want 30 (the project token's rest)", resp.ExpiresIn)
	}
	var rc refreshClaims
	if err := f.signer.verify(resp.RefreshToken, &rc); err != nil || !rc.Expiry.Time().Equal(short.Expires) {
		t.Fatalf("refresh expiry %v, want %v (%v)", rc.Expiry, short.Expires, err)
	}
}
