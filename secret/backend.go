package secret

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// Record is a pull secret as a Backend keeps it: the metadata in the clear
// and the value sealed. A backend stores records as they are: sealing, the
// AAD that binds a value to its metadata and the keyring stay in Store, so
// a backend (a file, a database) never holds anything it could open.
type Record struct {
	Secret
	// Sealed is the JSON of a Sealed value. It stays raw until a record is
	// opened, since a lookup reads every candidate record but opens one.
	Sealed json.RawMessage `json:"sealed"`
}

// Backend stores the sealed records of a Store. The default is FileBackend,
// a file in the data folder; package postgres implements it for replicas
// that share one database.
type Backend interface {
	// Load returns every record.
	Load(ctx context.Context) ([]Record, error)
	// LoadHost returns at least the records that have a registry pattern
	// on host (Pattern.Host() == host); it may return others too. It is
	// the lookup of every pull, so it should read as little as it can.
	LoadHost(ctx context.Context, host string) ([]Record, error)
	// Update runs fn on the current records, with every other Update (of
	// any process) held off until what fn returns is stored, or fn or the
	// store failed and nothing changed. The records fn is given are its
	// own to modify.
	Update(ctx context.Context, fn func(recs []Record) ([]Record, error)) error
	// String says where the records are, for messages ("store file
	// /path/secrets.json"). It never holds a credential.
	String() string
}

// WithBackend keeps the sealed records in b instead of the data folder's
// file. The keyring is still the key file (WithKeyFile).
func WithBackend(b Backend) Option {
	return func(s *Store) {
		if b != nil {
			s.backend = b
		}
	}
}

// FileBackend keeps records in secrets.json in the data folder, one record
// a line. Readers never lock: every write replaces the file atomically.
// Writers serialise on a file lock, so several processes may write at once
// without losing an update.
type FileBackend struct {
	home string
	path string
}

var _ Backend = (*FileBackend)(nil)

// NewFileBackend returns the file backend of the data folder home. It
// creates nothing until the first write.
func NewFileBackend(home string) *FileBackend {
	return &FileBackend{home: home, path: filepath.Join(home, storeFile)}
}

// Path is the store file.
func (b *FileBackend) Path() string { return b.path }

// String implements Backend.
func (b *FileBackend) String() string { return "store file " + b.path }

// document is the store file.
type document struct {
	Format  int      `json:"format"`
	Secrets []Record `json:"secrets"`
}

const (
	docHeader  = `{"format":1,"secrets":[`
	docTrailer = `]}`
)

// Load implements Backend.
func (b *FileBackend) Load(context.Context) ([]Record, error) {
	d, err := b.load()
	if err != nil {
		return nil, err
	}
	return d.Secrets, nil
}

func (b *FileBackend) load() (*document, error) {
	d, _, err := b.read()
	return d, err
}

// read returns the document and the bytes it was decoded from (nil when
// there is no file yet).
func (b *FileBackend) read() (*document, []byte, error) {
	raw, err := os.ReadFile(b.path)
	if errors.Is(err, fs.ErrNotExist) {
		return &document{Format: storeFormat}, nil, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("read store: %w", err)
	}
	d, err := b.parse(raw)
	return d, raw, err
}

func (b *FileBackend) parse(raw []byte) (*document, error) {
	var d document
	if err := json.Unmarshal(raw, &d); err != nil {
		return nil, fmt.Errorf("store file %s is damaged (%v); it was left as it is", b.path, err)
	}
	if d.Format != storeFormat {
		return nil, fmt.Errorf("store file %s: format %d, this version reads %d", b.path, d.Format, storeFormat)
	}
	return &d, nil
}

// LoadHost implements Backend: in a file of the shape save writes (one
// record a line), it decodes only the lines that name the host, since a
// record that does not cannot match it. A lookup happens on every pull, in
// a fresh helper process, and decoding every record was most of its work.
// Any other shape is decoded whole.
func (b *FileBackend) LoadHost(_ context.Context, host string) ([]Record, error) {
	raw, err := os.ReadFile(b.path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read store: %w", err)
	}
	lines := bytes.Split(bytes.TrimSuffix(raw, []byte("\n")), []byte("\n"))
	n := len(lines)
	if n < 2 || string(lines[0]) != docHeader || string(lines[n-1]) != docTrailer {
		return b.parseRecords(raw)
	}
	var out []Record
	for i, l := range lines[1 : n-1] {
		if i < n-3 {
			l = bytes.TrimSuffix(l, []byte(","))
		}
		if len(l) < 2 || l[0] != '{' || l[len(l)-1] != '}' {
			return b.parseRecords(raw) // not the shape save writes: let the full decoder judge it
		}
		if !bytes.Contains(l, []byte(host)) {
			continue
		}
		var r Record
		if err := json.Unmarshal(l, &r); err != nil {
			return nil, fmt.Errorf("store file %s is damaged (line %d: %v); it was left as it is", b.path, i+2, err)
		}
		out = append(out, r)
	}
	return out, nil
}

func (b *FileBackend) parseRecords(raw []byte) ([]Record, error) {
	d, err := b.parse(raw)
	if err != nil {
		return nil, err
	}
	return d.Secrets, nil
}

// Update implements Backend under the writers' file lock. The file is
// rewritten only when what fn returns differs from what it holds.
func (b *FileBackend) Update(_ context.Context, fn func(recs []Record) ([]Record, error)) error {
	if err := ensureDir(b.home); err != nil {
		return fmt.Errorf("open store: %w", err)
	}
	unlock, err := lockFile(filepath.Join(b.home, lockName))
	if err != nil {
		return err
	}
	defer unlock()
	// Only a lock holder writes temporary files, so any found now were left
	// by a writer that died.
	removeTemps(b.path)
	d, raw, err := b.read()
	if err != nil {
		return err
	}
	recs, err := fn(d.Secrets)
	if err != nil {
		return err
	}
	out, err := format(&document{Format: storeFormat, Secrets: recs})
	if err != nil {
		return err
	}
	if raw != nil && bytes.Equal(out, raw) {
		return nil
	}
	return writeFileAtomic(b.path, out)
}

// save writes d as it is (tests edit the file through it).
func (b *FileBackend) save(d *document) error {
	out, err := format(d)
	if err != nil {
		return err
	}
	return writeFileAtomic(b.path, out)
}

// format writes a document sorted by project and name, one record a line:
// compact enough that a lookup stays cheap, and still readable in a diff.
func format(d *document) ([]byte, error) {
	slices.SortFunc(d.Secrets, func(a, b Record) int {
		return strings.Compare(a.Project+"/"+a.Name, b.Project+"/"+b.Name)
	})
	var buf bytes.Buffer
	buf.WriteString(docHeader)
	for i, r := range d.Secrets {
		line, err := json.Marshal(r)
		if err != nil {
			return nil, err
		}
		if i > 0 {
			buf.WriteByte(',')
		}
		buf.WriteString("\n")
		buf.Write(line)
	}
	buf.WriteString("\n" + docTrailer + "\n")
	return buf.Bytes(), nil
}

// removeTemps removes the temporary files a writer of path left when it
// died.
func removeTemps(path string) {
	matches, _ := filepath.Glob(filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*"))
	for _, m := range matches {
		os.Remove(m)
	}
}
