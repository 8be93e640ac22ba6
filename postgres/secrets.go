package postgres

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"slices"

	"github.com/jackc/pgx/v5"
	"github.com/pullsecret/pullsecret/secret"
)

// Secrets keeps sealed pull-secret records in the table pull_secrets: each
// record as the store writes it (metadata and ciphertext, JSON), and the
// registry hosts of its patterns, indexed, for the lookup of a pull. The
// key that opens the records is never here.
type Secrets struct{ db *DB }

var _ secret.Backend = (*Secrets)(nil)

// Secrets returns the sealed secret backend of db.
func (db *DB) Secrets() *Secrets { return &Secrets{db: db} }

// secretsLock is the advisory lock key that serialises writers of
// pull_secrets: the ASCII of "pullsecr".
const secretsLock int64 = 0x70756c6c73656372

// String implements secret.Backend.
func (s *Secrets) String() string { return "secret store in " + s.db.String() }

// Load implements secret.Backend.
func (s *Secrets) Load(ctx context.Context) ([]secret.Record, error) {
	rows, _ := s.db.pool.Query(ctx, "SELECT record FROM pull_secrets ORDER BY project, name")
	recs, err := collectRecords(rows)
	if err != nil {
		return nil, s.db.wrap("load pull secrets", err)
	}
	return recs, nil
}

// LoadHost implements secret.Backend: exactly the records with a pattern
// on host, through the index on hosts.
func (s *Secrets) LoadHost(ctx context.Context, host string) ([]secret.Record, error) {
	rows, _ := s.db.pool.Query(ctx, "SELECT record FROM pull_secrets WHERE hosts @> ARRAY[$1::text] ORDER BY project, name", host)
	recs, err := collectRecords(rows)
	if err != nil {
		return nil, s.db.wrap("load pull secrets of "+host, err)
	}
	return recs, nil
}

func collectRecords(rows pgx.Rows) ([]secret.Record, error) {
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (secret.Record, error) {
		var raw []byte
		if err := r.Scan(&raw); err != nil {
			return secret.Record{}, err
		}
		var rec secret.Record
		if err := json.Unmarshal(raw, &rec); err != nil {
			// Never wrap the JSON error: it could quote the row.
			return secret.Record{}, fmt.Errorf("a pull_secrets row is not a sealed record")
		}
		return rec, nil
	})
}

// Update implements secret.Backend: one transaction holding an advisory
// lock that every writer takes first, so updates apply one after another
// and each sees the one before it. Only the rows that changed are written.
func (s *Secrets) Update(ctx context.Context, fn func(recs []secret.Record) ([]secret.Record, error)) error {
	var fnErr error
	err := pgx.BeginFunc(ctx, s.db.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1)", secretsLock); err != nil {
			return err
		}
		// Read after the lock: in READ COMMITTED each statement sees what
		// was committed before it started, so every earlier writer.
		rows, _ := tx.Query(ctx, "SELECT record FROM pull_secrets ORDER BY project, name")
		cur, err := collectRecords(rows)
		if err != nil {
			return err
		}
		// fn may change cur in place: remember what was stored first.
		type row struct {
			project, name string
			json          []byte
		}
		old := make(map[string]row, len(cur))
		for _, r := range cur {
			b, err := json.Marshal(r)
			if err != nil {
				return err
			}
			old[r.Project+"/"+r.Name] = row{r.Project, r.Name, b}
		}
		next, err := fn(cur)
		if err != nil {
			fnErr = err
			return err
		}
		keep := make(map[string]bool, len(next))
		for _, r := range next {
			k := r.Project + "/" + r.Name
			if keep[k] {
				return fmt.Errorf("secret %s in project %s twice", r.Name, r.Project)
			}
			keep[k] = true
			b, err := json.Marshal(r)
			if err != nil {
				return err
			}
			if o, ok := old[k]; ok && bytes.Equal(b, o.json) {
				continue
			}
			if _, err := tx.Exec(ctx, `INSERT INTO pull_secrets (project, name, hosts, record) VALUES ($1, $2, $3, $4)
				ON CONFLICT (project, name) DO UPDATE SET hosts = EXCLUDED.hosts, record = EXCLUDED.record`,
				r.Project, r.Name, hosts(r.Registries), b); err != nil {
				return err
			}
		}
		for k, o := range old {
			if !keep[k] {
				if _, err := tx.Exec(ctx, "DELETE FROM pull_secrets WHERE project = $1 AND name = $2", o.project, o.name); err != nil {
					return err
				}
			}
		}
		return nil
	})
	if fnErr != nil {
		return fnErr // the store's own error, as it made it
	}
	return s.db.wrap("update pull secrets", err)
}

// hosts are the distinct registry hosts of patterns.
func hosts(ps []secret.Pattern) []string {
	out := []string{}
	for _, p := range ps {
		if h := p.Host(); !slices.Contains(out, h) {
			out = append(out, h)
		}
	}
	return out
}
