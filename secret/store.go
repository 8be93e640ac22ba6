package secret

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// File names inside the home folder.
const (
	storeFile = "secrets.json"
	keyFile   = "key"
	lockName  = ".lock"
)

const storeFormat = 1

// Store is the sealed store of pull secrets: records sealed with the keyring
// of a key file, kept by a Backend (by default FileBackend, the file
// secrets.json in the data folder).
type Store struct {
	home      string
	keyPath   string
	backend   Backend
	now       func() time.Time
	providers map[Kind]Provider
}

// Option configures a Store.
type Option func(*Store)

// WithKeyFile names the keyring file (default: "key" in the home folder).
func WithKeyFile(path string) Option {
	return func(s *Store) {
		if path != "" {
			s.keyPath = path
		}
	}
}

// WithClock sets the clock used for timestamps.
func WithClock(now func() time.Time) Option { return func(s *Store) { s.now = now } }

// WithProvider registers the provider that turns secrets of a kind into
// credentials at pull time.
func WithProvider(k Kind, p Provider) Option { return func(s *Store) { s.providers[k] = p } }

// Open opens (creating if needed) the store in home.
func Open(home string, opts ...Option) (*Store, error) {
	if home == "" {
		return nil, errors.New("open store: no home folder")
	}
	s := &Store{
		home:      home,
		keyPath:   filepath.Join(home, keyFile),
		now:       time.Now,
		providers: map[Kind]Provider{Basic: Static{}, Token: Static{}},
	}
	for _, o := range opts {
		o(s)
	}
	if s.backend == nil {
		s.backend = NewFileBackend(home)
	}
	if err := ensureDir(home); err != nil {
		return nil, fmt.Errorf("open store: %w", err)
	}
	return s, nil
}

// Home is the store's folder.
func (s *Store) Home() string { return s.home }

// Path is where the records are: the store file, or the description of
// another backend (WithBackend).
func (s *Store) Path() string {
	if f, ok := s.backend.(*FileBackend); ok {
		return f.Path()
	}
	return s.backend.String()
}

// aad binds a sealed value to what decides where it is sent: its project,
// name, kind and registries. Editing any of them in the file makes the value
// fail to open rather than go to another registry.
func aad(s Secret) []byte {
	b, _ := json.Marshal([]any{"pullsecret/v1", s.Project, s.Name, s.Kind, s.Registries})
	return b
}

func (s *Store) keyring(create bool) (*Keyring, error) {
	k, err := LoadKeyring(s.keyPath)
	if err == nil {
		return k, nil
	}
	if !errors.Is(err, fs.ErrNotExist) || !create {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("key file %s does not exist", s.keyPath)
		}
		return nil, err
	}
	k, err = NewKeyring()
	if err != nil {
		return nil, err
	}
	if err := ensureDir(filepath.Dir(s.keyPath)); err != nil {
		return nil, err
	}
	if err := k.Save(s.keyPath); err != nil {
		return nil, err
	}
	return k, nil
}

// update runs fn, under the backend's writers' lock, on the current records
// and the keyring (created on the first write), and stores what it leaves.
func (s *Store) update(ctx context.Context, fn func(d *document, k *Keyring) error) error {
	return s.backend.Update(ctx, func(recs []Record) ([]Record, error) {
		// Only a writer holding the lock writes the key file, so temporary
		// key files found now were left by a writer that died.
		removeTemps(s.keyPath)
		k, err := s.keyring(true)
		if err != nil {
			return nil, err
		}
		d := &document{Format: storeFormat, Secrets: recs}
		if err := fn(d, k); err != nil {
			return nil, err
		}
		return d.Secrets, nil
	})
}

func find(recs []Record, project, name string) int {
	return slices.IndexFunc(recs, func(r Record) bool { return r.Project == project && r.Name == name })
}

// conflict reports a secret in the same project that already claims one of
// sec's registry patterns exactly: resolution would be ambiguous.
func conflict(d *document, sec Secret) error {
	for _, r := range d.Secrets {
		if r.Project != sec.Project || r.Name == sec.Name {
			continue
		}
		for _, p := range sec.Registries {
			if slices.Contains(r.Registries, p) {
				return fmt.Errorf("registry %s is already covered by secret %s in project %s", p, r.Name, r.Project)
			}
		}
	}
	return nil
}

func (s *Store) seal(k *Keyring, sec Secret, v Value) (Record, error) {
	sealed, err := k.SealJSON(v, aad(sec))
	if err != nil {
		return Record{}, fmt.Errorf("seal %s/%s: %w", sec.Project, sec.Name, err)
	}
	raw, err := json.Marshal(sealed)
	if err != nil {
		return Record{}, err
	}
	return Record{Secret: sec, Sealed: raw}, nil
}

func (s *Store) open(k *Keyring, r Record) (Value, error) {
	var sealed Sealed
	if err := json.Unmarshal(r.Sealed, &sealed); err != nil {
		return Value{}, fmt.Errorf("%s: secret %s/%s: sealed value is damaged", s.backend, r.Project, r.Name)
	}
	var v Value
	if err := k.OpenJSON(sealed, aad(r.Secret), &v); err != nil {
		return Value{}, fmt.Errorf("%s: secret %s/%s: %w", s.backend, r.Project, r.Name, err)
	}
	return v, nil
}

func defaults(sec *Secret) {
	if sec.Project == "" {
		sec.Project = DefaultProject
	}
}

// Create adds a new secret. It fails with ErrExists if the name is taken.
func (s *Store) Create(ctx context.Context, sec Secret, v Value) (Secret, error) {
	return s.put(ctx, sec, v, false)
}

// Put creates a secret or replaces the value and registries of an existing
// one of the same name, bumping its version.
func (s *Store) Put(ctx context.Context, sec Secret, v Value) (Secret, error) {
	return s.put(ctx, sec, v, true)
}

func (s *Store) put(ctx context.Context, sec Secret, v Value, replace bool) (Secret, error) {
	defaults(&sec)
	if err := Validate(sec, v); err != nil {
		return Secret{}, err
	}
	var out Secret
	err := s.update(ctx, func(d *document, k *Keyring) error {
		if err := conflict(d, sec); err != nil {
			return err
		}
		now := s.now().UTC()
		i := find(d.Secrets, sec.Project, sec.Name)
		if i >= 0 && !replace {
			return fmt.Errorf("secret %s in project %s: %w", sec.Name, sec.Project, ErrExists)
		}
		sec.Created, sec.Updated, sec.Version = now, now, 1
		if i >= 0 {
			old := d.Secrets[i].Secret
			sec.Created, sec.Version = old.Created, old.Version+1
		}
		r, err := s.seal(k, sec, v)
		if err != nil {
			return err
		}
		if i >= 0 {
			d.Secrets[i] = r
		} else {
			d.Secrets = append(d.Secrets, r)
		}
		out = sec
		return nil
	})
	return out, err
}

// Rotate replaces a secret's value, keeping its kind and registries.
func (s *Store) Rotate(ctx context.Context, project, name string, v Value) (Secret, error) {
	if project == "" {
		project = DefaultProject
	}
	var out Secret
	err := s.update(ctx, func(d *document, k *Keyring) error {
		i := find(d.Secrets, project, name)
		if i < 0 {
			return fmt.Errorf("secret %s in project %s: %w", name, project, ErrNotFound)
		}
		sec := d.Secrets[i].Secret
		old, err := s.open(k, d.Secrets[i])
		if err != nil {
			return err
		}
		if v.Username == "" && sec.Kind == Basic {
			v.Username = old.Username
		}
		if err := Validate(sec, v); err != nil {
			return err
		}
		sec.Version++
		sec.Updated = s.now().UTC()
		r, err := s.seal(k, sec, v)
		if err != nil {
			return err
		}
		d.Secrets[i] = r
		out = sec
		return nil
	})
	return out, err
}

// Delete removes a secret.
func (s *Store) Delete(ctx context.Context, project, name string) error {
	if project == "" {
		project = DefaultProject
	}
	return s.update(ctx, func(d *document, _ *Keyring) error {
		i := find(d.Secrets, project, name)
		if i < 0 {
			return fmt.Errorf("secret %s in project %s: %w", name, project, ErrNotFound)
		}
		d.Secrets = slices.Delete(d.Secrets, i, i+1)
		return nil
	})
}

// RemoveRegistry drops one registry pattern from whichever secret of the
// project claims it exactly, and deletes the secret if it had no other. It
// returns the name of the secret it changed.
func (s *Store) RemoveRegistry(ctx context.Context, project string, p Pattern) (string, error) {
	if project == "" {
		project = DefaultProject
	}
	var changed string
	err := s.update(ctx, func(d *document, k *Keyring) error {
		for i, r := range d.Secrets {
			if r.Project != project || !slices.Contains(r.Registries, p) {
				continue
			}
			changed = r.Name
			if len(r.Registries) == 1 {
				d.Secrets = slices.Delete(d.Secrets, i, i+1)
				return nil
			}
			v, err := s.open(k, r)
			if err != nil {
				return err
			}
			sec := r.Secret
			sec.Registries = slices.DeleteFunc(slices.Clone(sec.Registries), func(q Pattern) bool { return q == p })
			sec.Version++
			sec.Updated = s.now().UTC()
			nr, err := s.seal(k, sec, v)
			if err != nil {
				return err
			}
			d.Secrets[i] = nr
			return nil
		}
		return fmt.Errorf("registry %s in project %s: %w", p, project, ErrNotFound)
	})
	return changed, err
}

// Get returns a secret's metadata.
func (s *Store) Get(ctx context.Context, project, name string) (Secret, error) {
	if project == "" {
		project = DefaultProject
	}
	recs, err := s.backend.Load(ctx)
	if err != nil {
		return Secret{}, err
	}
	i := find(recs, project, name)
	if i < 0 {
		return Secret{}, fmt.Errorf("secret %s in project %s: %w", name, project, ErrNotFound)
	}
	return recs[i].Secret, nil
}

// Value returns a secret's metadata and its opened value.
func (s *Store) Value(ctx context.Context, project, name string) (Secret, Value, error) {
	if project == "" {
		project = DefaultProject
	}
	recs, err := s.backend.Load(ctx)
	if err != nil {
		return Secret{}, Value{}, err
	}
	i := find(recs, project, name)
	if i < 0 {
		return Secret{}, Value{}, fmt.Errorf("secret %s in project %s: %w", name, project, ErrNotFound)
	}
	k, err := s.keyring(false)
	if err != nil {
		return Secret{}, Value{}, err
	}
	v, err := s.open(k, recs[i])
	return recs[i].Secret, v, err
}

// List returns the secrets of a project, or of every project if project is
// "", sorted by project and name.
func (s *Store) List(ctx context.Context, project string) ([]Secret, error) {
	recs, err := s.backend.Load(ctx)
	if err != nil {
		return nil, err
	}
	var out []Secret
	for _, r := range recs {
		if project == "" || r.Project == project {
			out = append(out, r.Secret)
		}
	}
	slices.SortFunc(out, func(a, b Secret) int {
		return cmp.Or(strings.Compare(a.Project, b.Project), strings.Compare(a.Name, b.Name))
	})
	return out, nil
}

// Match finds the project's secret whose registry pattern covers t, the
// longest pattern winning. When t has no repository (Docker CLI sends only a
// host), a whole-registry pattern wins; failing that, a single secret
// covering part of the host is used, and several are an error since the
// caller gave nothing to choose between them.
func (s *Store) Match(ctx context.Context, project string, t Target) (Secret, Value, error) {
	if project == "" {
		project = DefaultProject
	}
	recs, err := s.backend.LoadHost(ctx, t.Host)
	if err != nil {
		return Secret{}, Value{}, err
	}
	best, err := bestMatch(len(recs), func(i int) *Secret { return &recs[i].Secret }, project, t)
	if err != nil {
		return Secret{}, Value{}, err
	}
	k, err := s.keyring(false)
	if err != nil {
		return Secret{}, Value{}, err
	}
	v, err := s.open(k, recs[best])
	return recs[best].Secret, v, err
}

// Resolve is the pull-time step: it finds the secret for t and asks its
// kind's provider for a credential.
func (s *Store) Resolve(ctx context.Context, project string, t Target) (Secret, Credential, error) {
	sec, v, err := s.Match(ctx, project, t)
	if err != nil {
		return Secret{}, Credential{}, err
	}
	p, ok := s.providers[sec.Kind]
	if !ok {
		return Secret{}, Credential{}, fmt.Errorf("secret %s: no provider for kind %q", sec.Name, sec.Kind)
	}
	c, err := p.Credential(ctx, sec, v, t)
	if err != nil {
		return Secret{}, Credential{}, fmt.Errorf("secret %s for %s: %w", sec.Name, t, err)
	}
	return sec, c, nil
}

// RotateKey adds a new key, re-seals every secret under it and then drops
// the old keys. A crash at any point leaves every record openable: the new
// key is saved beside the old ones before anything is re-sealed, and the
// old keys are dropped only once the re-sealed records are stored, and only
// if every record is then sealed by the current key.
func (s *Store) RotateKey(ctx context.Context) (string, error) {
	var id string
	err := s.update(ctx, func(d *document, k *Keyring) error {
		values := make([]Value, len(d.Secrets))
		for i, r := range d.Secrets {
			v, err := s.open(k, r)
			if err != nil {
				return err
			}
			values[i] = v
		}
		var err error
		if id, err = k.Add(); err != nil {
			return err
		}
		if err := k.Save(s.keyPath); err != nil {
			return err
		}
		for i, r := range d.Secrets {
			nr, err := s.seal(k, r.Secret, values[i])
			if err != nil {
				return err
			}
			d.Secrets[i] = nr
		}
		return nil
	})
	if err != nil {
		return "", err
	}
	// A second pass under the writers' lock: a backend stores what the
	// first returned only as it ends, and another writer may have come
	// between the two (another rotation, too). Old keys go only when no
	// record needs them.
	err = s.update(ctx, func(d *document, k *Keyring) error {
		for _, r := range d.Secrets {
			var sl Sealed
			if err := json.Unmarshal(r.Sealed, &sl); err != nil || sl.KeyID != k.Current {
				return nil
			}
		}
		if len(k.Keys) == 1 {
			return nil
		}
		k.Retain()
		return k.Save(s.keyPath)
	})
	return id, err
}

// MatchSecret picks, among secs, the secret of project that Match would
// use for t (the most specific registry pattern), without opening any
// value: for naming it, as the audit trail does.
func MatchSecret(secs []Secret, project string, t Target) (Secret, error) {
	if project == "" {
		project = DefaultProject
	}
	i, err := bestMatch(len(secs), func(i int) *Secret { return &secs[i] }, project, t)
	if err != nil {
		return Secret{}, err
	}
	return secs[i], nil
}

// bestMatch is the index of the n secrets (at(i)) whose registry pattern
// matches t most specifically, among project's. With no repository in t, a
// single secret covering part of the host is taken; several are ambiguous.
func bestMatch(n int, at func(int) *Secret, project string, t Target) (int, error) {
	best, bestScore := -1, 0
	var partial []int
	for i := range n {
		r := at(i)
		if r.Project != project {
			continue
		}
		for _, p := range r.Registries {
			if sc := p.Match(t); sc > bestScore {
				best, bestScore = i, sc
			}
			if t.Repo == "" && p.Host() == t.Host && p.Prefix() != "" && !slices.Contains(partial, i) {
				partial = append(partial, i)
			}
		}
	}
	if best >= 0 {
		return best, nil
	}
	switch len(partial) {
	case 0:
		return -1, fmt.Errorf("%s in project %s: %w", t, project, ErrNotFound)
	case 1:
		return partial[0], nil
	}
	var names []string
	for _, i := range partial {
		names = append(names, at(i).Name)
	}
	return -1, fmt.Errorf("%s in project %s: secrets %s each cover part of this registry and the client named no repository", t, project, strings.Join(names, ", "))
}
