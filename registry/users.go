package registry

import (
	"bytes"
	"crypto/subtle"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/bcrypt"
)

const (
	// seedUser is the internal account the Seed* helpers use when
	// authentication is on. Its password is random and never leaves the
	// process.
	seedUser = "pullsecret-seed"
	// basicRealm is the realm in htpasswd Basic challenges.
	basicRealm = "pullsecret-registry"
)

// userStore holds the accounts of an authenticating registry. With htpasswd it
// also keeps distribution's htpasswd file in step with the accounts.
type userStore struct {
	htpasswdPath string // "" under token auth

	mu      sync.Mutex
	pass    map[string]string
	gen     map[string]uint64 // bumped on every change; invalidates refresh tokens
	modTime time.Time         // last mtime we gave the htpasswd file
}

func newUserStore(users map[string]string, htpasswdPath string) (*userStore, error) {
	s := &userStore{
		htpasswdPath: htpasswdPath,
		pass:         map[string]string{seedUser: randomHex(16)},
		gen:          map[string]uint64{},
	}
	for u, p := range users {
		if err := validUser(u); err != nil {
			return nil, err
		}
		s.pass[u] = p
	}
	if err := s.writeHTPasswdLocked(); err != nil {
		return nil, err
	}
	return s, nil
}

func validUser(u string) error {
	switch {
	case u == "":
		return errors.New("registry: empty user name")
	case u == seedUser:
		return fmt.Errorf("registry: user name %q is reserved for seeding", u)
	case strings.ContainsAny(u, ":\n\r"):
		// ':' separates user and hash in htpasswd and user and password in
		// Basic credentials.
		return fmt.Errorf("registry: user name %q contains ':' or a newline", u)
	}
	return nil
}

// check reports whether pass is user's password.
func (s *userStore) check(user, pass string) bool {
	s.mu.Lock()
	want, ok := s.pass[user]
	s.mu.Unlock()
	// Compare even for unknown users so timing says little about which
	// users exist (a test registry, but it costs nothing).
	eq := subtle.ConstantTimeCompare([]byte(pass), []byte(want)) == 1
	return ok && eq
}

func (s *userStore) generation(user string) (uint64, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.pass[user]
	return s.gen[user], ok
}

func (s *userStore) seedPassword() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.pass[seedUser]
}

func (s *userStore) set(user, pass string) error {
	if err := validUser(user); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pass[user] = pass
	s.gen[user]++
	return s.writeHTPasswdLocked()
}

func (s *userStore) delete(user string) error {
	if err := validUser(user); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.pass[user]; !ok {
		return fmt.Errorf("registry: no user %q", user)
	}
	delete(s.pass, user)
	s.gen[user]++
	return s.writeHTPasswdLocked()
}

// writeHTPasswdLocked rewrites the htpasswd file atomically.
//
// distribution's htpasswd controller stats the file on every request and
// re-reads it when the mtime differs from the one it loaded, so a rewrite
// takes effect on the next request. The kernel stamps files with a coarse
// clock (a few ms), so two rewrites in quick succession can get the same
// mtime and the second would go unnoticed; we therefore set the mtime
// ourselves, strictly increasing by a whole second (safe on filesystems with
// 1 s resolution too).
func (s *userStore) writeHTPasswdLocked() error {
	if s.htpasswdPath == "" {
		return nil
	}
	var buf bytes.Buffer
	for _, u := range slices.Sorted(maps.Keys(s.pass)) {
		h, err := bcrypt.GenerateFromPassword([]byte(s.pass[u]), bcrypt.MinCost)
		if err != nil {
			return fmt.Errorf("registry: hash password of %q: %w", u, err)
		}
		fmt.Fprintf(&buf, "%s:%s\n", u, h)
	}
	tmp, err := os.CreateTemp(filepath.Dir(s.htpasswdPath), ".htpasswd-*")
	if err != nil {
		return fmt.Errorf("registry: write htpasswd: %w", err)
	}
	defer os.Remove(tmp.Name()) // no-op after the rename
	if _, err := tmp.Write(buf.Bytes()); err != nil {
		tmp.Close()
		return fmt.Errorf("registry: write htpasswd: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("registry: write htpasswd: %w", err)
	}
	mt := time.Now().Truncate(time.Second)
	if !mt.After(s.modTime) {
		mt = s.modTime.Add(time.Second)
	}
	if err := os.Chtimes(tmp.Name(), mt, mt); err != nil {
		return fmt.Errorf("registry: set htpasswd mtime: %w", err)
	}
	if err := os.Rename(tmp.Name(), s.htpasswdPath); err != nil {
		return fmt.Errorf("registry: replace htpasswd: %w", err)
	}
	s.modTime = mt
	return nil
}

// SetPassword adds user or changes its password. It takes effect on the next
// request: under htpasswd distribution re-reads the rewritten file; under
// token auth the token endpoint checks the new password and refresh tokens
// issued before are revoked. Tokens already issued stay valid until they
// expire, as with a real token server.
func (r *Registry) SetPassword(user, pass string) error {
	if r.users == nil {
		return errors.New("registry: SetPassword on a registry without authentication")
	}
	return r.users.set(user, pass)
}

// DeleteUser removes user, with the same timing as SetPassword.
func (r *Registry) DeleteUser(user string) error {
	if r.users == nil {
		return errors.New("registry: DeleteUser on a registry without authentication")
	}
	return r.users.delete(user)
}
