package secret

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"
)

// Keyring holds the AES-256 keys that seal secrets. Each sealed record names
// the id of the key that sealed it, so a new key can be introduced and the
// store re-sealed without a flag day.
type Keyring struct {
	Current string    `json:"current"`
	Keys    []KeyInfo `json:"keys"`
}

// KeyInfo is one key of a Keyring.
type KeyInfo struct {
	ID      string    `json:"id"`
	Key     []byte    `json:"key"` // 32 bytes, base64 in JSON
	Created time.Time `json:"created"`
}

// Sealed is a value encrypted with AES-256-GCM.
type Sealed struct {
	KeyID string `json:"key_id"`
	Nonce []byte `json:"nonce"`
	Data  []byte `json:"data"`
}

// ErrKey is returned when a sealed value cannot be opened: a wrong key, or a
// record that was tampered with.
var ErrKey = errors.New("cannot open sealed value (wrong key or tampered data)")

// NewKeyring makes a keyring with one fresh key.
func NewKeyring() (*Keyring, error) {
	k := &Keyring{}
	if _, err := k.Add(); err != nil {
		return nil, err
	}
	return k, nil
}

// Add creates a new key and makes it current.
func (k *Keyring) Add() (string, error) {
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		return "", fmt.Errorf("generate key: %w", err)
	}
	idb := make([]byte, 8)
	if _, err := rand.Read(idb); err != nil {
		return "", fmt.Errorf("generate key id: %w", err)
	}
	id := hex.EncodeToString(idb)
	k.Keys = append(k.Keys, KeyInfo{ID: id, Key: key, Created: time.Now().UTC()})
	k.Current = id
	return id, nil
}

// Retain drops every key but the current one.
func (k *Keyring) Retain() {
	for _, ki := range k.Keys {
		if ki.ID == k.Current {
			k.Keys = []KeyInfo{ki}
			return
		}
	}
}

func (k *Keyring) key(id string) ([]byte, bool) {
	for _, ki := range k.Keys {
		if ki.ID == id {
			return ki.Key, true
		}
	}
	return nil, false
}

func (k *Keyring) validate() error {
	if len(k.Keys) == 0 {
		return errors.New("no keys")
	}
	seen := map[string]bool{}
	for _, ki := range k.Keys {
		if len(ki.Key) != 32 {
			return fmt.Errorf("key %s: %d bytes, want 32", ki.ID, len(ki.Key))
		}
		if ki.ID == "" || seen[ki.ID] {
			return fmt.Errorf("key id %q empty or repeated", ki.ID)
		}
		seen[ki.ID] = true
	}
	if _, ok := k.key(k.Current); !ok {
		return fmt.Errorf("current key %q is not in the keyring", k.Current)
	}
	return nil
}

// Seal encrypts plaintext under the current key. aad binds the ciphertext
// to its record, so a sealed value moved to another record does not open.
func (k *Keyring) Seal(plaintext, aad []byte) (Sealed, error) {
	key, ok := k.key(k.Current)
	if !ok {
		return Sealed{}, fmt.Errorf("current key %q missing", k.Current)
	}
	aead, err := newGCM(key)
	if err != nil {
		return Sealed{}, err
	}
	nonce := make([]byte, aead.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		return Sealed{}, fmt.Errorf("nonce: %w", err)
	}
	return Sealed{KeyID: k.Current, Nonce: nonce, Data: aead.Seal(nil, nonce, plaintext, aad)}, nil
}

// Open decrypts a sealed value.
func (k *Keyring) Open(s Sealed, aad []byte) ([]byte, error) {
	key, ok := k.key(s.KeyID)
	if !ok {
		return nil, fmt.Errorf("%w: key %q is not in the keyring", ErrKey, s.KeyID)
	}
	aead, err := newGCM(key)
	if err != nil {
		return nil, err
	}
	if len(s.Nonce) != aead.NonceSize() {
		return nil, ErrKey
	}
	pt, err := aead.Open(nil, s.Nonce, s.Data, aad)
	if err != nil {
		return nil, ErrKey
	}
	return pt, nil
}

func newGCM(key []byte) (cipher.AEAD, error) {
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("aes: %w", err)
	}
	return cipher.NewGCM(block)
}

// LoadKeyring reads a keyring file.
func LoadKeyring(path string) (*Keyring, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var k Keyring
	if err := json.Unmarshal(b, &k); err != nil {
		return nil, fmt.Errorf("key file %s: not a pullsecret keyring: %w", path, err)
	}
	if err := k.validate(); err != nil {
		return nil, fmt.Errorf("key file %s: %w", path, err)
	}
	return &k, nil
}

// Save writes the keyring atomically with mode 0600.
func (k *Keyring) Save(path string) error {
	b, err := k.Marshal()
	if err != nil {
		return err
	}
	return writeFileAtomic(path, b)
}

// Marshal is the key file's content.
func (k *Keyring) Marshal() ([]byte, error) {
	b, err := json.MarshalIndent(k, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

// SealJSON seals v as JSON.
func (k *Keyring) SealJSON(v any, aad []byte) (Sealed, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return Sealed{}, err
	}
	defer clear(b)
	return k.Seal(b, aad)
}

// OpenJSON opens a sealed JSON value into v.
func (k *Keyring) OpenJSON(s Sealed, aad []byte, v any) error {
	b, err := k.Open(s, aad)
	if err != nil {
		return err
	}
	defer clear(b)
	if err := json.Unmarshal(b, v); err != nil {
		// Never wrap the JSON error: it could quote the plaintext.
		return errors.New("sealed value is not valid JSON")
	}
	return nil
}
