package proxy

// Registry tokens: the short-lived JWTs the token server issues, signed with
// ES256 by a key kept in the data folder. They are verified only against
// our own keys: a key or certificate carried in a token's header (jwk, x5c,
// jku) is never used, only the kid picks one of ours.

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/pullsecret/pullsecret/internal/fsutil"
)

// SigningKeysFile is the file in the data folder holding the token signing
// keys (a JWK set with private keys, mode 0600). The first key signs; every
// key verifies, so a new key can be put first while tokens signed by the
// old one run out.
const SigningKeysFile = "token-signing-keys.json"

// Values of the token_use claim.
const (
	useAccess  = "access"
	useRefresh = "refresh"
)

// Signer signs and verifies registry tokens with our own ES256 keys.
type Signer struct {
	keys   []jose.JSONWebKey // private keys; keys[0] signs
	pub    map[string]*ecdsa.PublicKey
	signer jose.Signer
}

// LoadSigner loads the signing keys of the data folder home, creating a
// key on first start.
func LoadSigner(home string) (*Signer, error) {
	if home == "" {
		return nil, errors.New("load signing key: no home folder")
	}
	if err := os.MkdirAll(home, 0o700); err != nil {
		return nil, fmt.Errorf("load signing key: %w", err)
	}
	path := filepath.Join(home, SigningKeysFile)
	if s, err := readSigner(path); !errors.Is(err, fs.ErrNotExist) {
		return s, err
	}
	unlock, err := fsutil.Lock(filepath.Join(home, tokensLock))
	if err != nil {
		return nil, err
	}
	defer unlock()
	// Another process may have created it while we waited.
	if s, err := readSigner(path); !errors.Is(err, fs.ErrNotExist) {
		return s, err
	}
	data, err := NewSigningKeySet()
	if err != nil {
		return nil, err
	}
	if err := fsutil.WriteFileAtomic(path, data); err != nil {
		return nil, fmt.Errorf("save signing key: %w", err)
	}
	return parseSigner(path, data)
}

// NewSigningKeySet makes a signing key file's content with one fresh key:
// what LoadSigner writes on first start, and `pullsecret cluster init`
// for the replicas to share.
func NewSigningKeySet() ([]byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate signing key: %w", err)
	}
	s, err := NewSigner(key)
	if err != nil {
		return nil, err
	}
	data, err := json.Marshal(jose.JSONWebKeySet{Keys: s.keys})
	if err != nil {
		return nil, err
	}
	return append(data, '\n'), nil
}

func readSigner(path string) (*Signer, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
		return nil, fmt.Errorf("read signing key: %w", err)
	}
	return parseSigner(path, data)
}

// parseSigner reads the signing key file content data (from path).
func parseSigner(path string, data []byte) (*Signer, error) {
	var set jose.JSONWebKeySet
	if err := json.Unmarshal(data, &set); err != nil {
		return nil, fmt.Errorf("signing key file %s is damaged; it was left as it is", path)
	}
	var keys []*ecdsa.PrivateKey
	for _, k := range set.Keys {
		pk, ok := k.Key.(*ecdsa.PrivateKey)
		if !ok || pk.Curve != elliptic.P256() {
			return nil, fmt.Errorf("signing key file %s: want P-256 private keys", path)
		}
		keys = append(keys, pk)
	}
	return NewSigner(keys...)
}

// NewSigner returns a signer over P-256 keys; the first one signs. Key ids
// are the keys' RFC 7638 thumbprints.
func NewSigner(keys ...*ecdsa.PrivateKey) (*Signer, error) {
	if len(keys) == 0 {
		return nil, errors.New("signer: no key")
	}
	s := &Signer{pub: map[string]*ecdsa.PublicKey{}}
	for _, k := range keys {
		if k == nil || k.Curve != elliptic.P256() {
			return nil, errors.New("signer: want P-256 keys (ES256)")
		}
		jwk := jose.JSONWebKey{Key: k, Algorithm: string(jose.ES256), Use: "sig"}
		tp, err := jwk.Thumbprint(crypto.SHA256)
		if err != nil {
			return nil, fmt.Errorf("signer: %w", err)
		}
		jwk.KeyID = base64.RawURLEncoding.EncodeToString(tp)
		s.keys = append(s.keys, jwk)
		s.pub[jwk.KeyID] = &k.PublicKey
	}
	sig, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: s.keys[0]},
		(&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		return nil, fmt.Errorf("signer: %w", err)
	}
	s.signer = sig
	return s, nil
}

// KeyID is the id (kid) of the signing key.
func (s *Signer) KeyID() string { return s.keys[0].KeyID }

// PublicKeys is the set of public keys that verify our tokens, e.g. for a
// JWKS endpoint.
func (s *Signer) PublicKeys() jose.JSONWebKeySet {
	var set jose.JSONWebKeySet
	for _, k := range s.keys {
		set.Keys = append(set.Keys, k.Public())
	}
	return set
}

func (s *Signer) sign(claims any) (string, error) {
	return jwt.Signed(s.signer).Claims(claims).Serialize()
}

// errBadJWT is why a JWT was refused; never shown with token content.
var errBadJWT = errors.New("invalid registry token")

// verify checks raw's signature against our keys only and decodes its
// claims into dest. Claims are validated by the caller.
func (s *Signer) verify(raw string, dest any) error {
	if len(raw) > 16<<10 {
		return errBadJWT
	}
	tok, err := jwt.ParseSigned(raw, []jose.SignatureAlgorithm{jose.ES256})
	if err != nil || len(tok.Headers) != 1 {
		return errBadJWT
	}
	h := tok.Headers[0]
	if h.Algorithm != string(jose.ES256) {
		return errBadJWT
	}
	// Only the kid is read from the header, to pick one of our keys; an
	// embedded jwk, x5c or jku is ignored.
	key, ok := s.pub[h.KeyID]
	if !ok {
		return errBadJWT
	}
	if err := tok.Claims(key, dest); err != nil {
		return errBadJWT
	}
	return nil
}

// accessClaims are the claims of the registry tokens the token server
// issues, as the distribution token spec defines them, plus the project.
type accessClaims struct {
	jwt.Claims
	Project string   `json:"project"`
	Use     string   `json:"token_use"`
	Access  []Access `json:"access"`
}

// refreshClaims are the claims of a refresh token (access_type=offline):
// it names the project token, is good for the token server only, and dies
// with the project token.
type refreshClaims struct {
	jwt.Claims
	Project string `json:"project"`
	Use     string `json:"token_use"`
}

// jti returns a random token id.
func jti() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return base64.RawURLEncoding.EncodeToString(b[:])
}
