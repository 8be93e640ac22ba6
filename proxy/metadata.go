package proxy

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
)

// Metadata drivers (MetadataConfig.Driver).
const (
	// MetadataFile keeps the metadata in files of the data folder: one
	// machine (several processes may share the folder).
	MetadataFile = "file"
	// MetadataPostgres keeps it in a PostgreSQL database, shared by every
	// replica (package postgres).
	MetadataPostgres = "postgres"
)

// MetadataConfig says where the metadata lives: project tokens and their
// revocations, the sealed pull secrets, access records, fill leases and
// the audit trail. The key that opens the secrets is a file either way
// (PULLSECRET_KEY_FILE).
type MetadataConfig struct {
	// Driver is "file" (the default) or "postgres".
	Driver string `yaml:"driver"`
	// DSN is the PostgreSQL connection string. It holds a password: prefer
	// DSNFile, since a config file is often readable by more people than
	// a secret.
	DSN string `yaml:"dsn"`
	// DSNFile is a file holding the DSN (a mounted Kubernetes Secret).
	DSNFile string `yaml:"dsn_file"`
}

// String never shows the DSN: a config printed whole must not leak it.
func (m MetadataConfig) String() string {
	dsn := ""
	if m.DSN != "" {
		dsn = "REDACTED"
	}
	return fmt.Sprintf("{Driver:%s DSN:%s DSNFile:%s}", m.Driver, dsn, m.DSNFile)
}

// GoString keeps %#v from leaking the DSN too.
func (m MetadataConfig) GoString() string { return "proxy.MetadataConfig" + m.String() }

// maxDSNFile bounds a DSN file.
const maxDSNFile = 64 << 10

// validate canonicalises the driver and checks that the DSN comes from
// exactly one place. Messages never quote the DSN.
func (m *MetadataConfig) validate(audit AuditConfig) error {
	var errs []error
	switch strings.ToLower(m.Driver) {
	case "", MetadataFile:
		m.Driver = MetadataFile
		if m.DSN != "" || m.DSNFile != "" {
			errs = append(errs, errors.New("metadata: dsn and dsn_file are for driver postgres"))
		}
	case MetadataPostgres, "postgresql":
		m.Driver = MetadataPostgres
		if (m.DSN == "") == (m.DSNFile == "") {
			errs = append(errs, errors.New("metadata: driver postgres needs dsn or dsn_file (one of them)"))
		}
		if audit.Enabled && audit.Path != "" {
			errs = append(errs, errors.New("audit.path: with metadata driver postgres the audit trail is in the database; remove audit.path"))
		}
	default:
		errs = append(errs, fmt.Errorf("metadata.driver: %q (want file or postgres)", printableConfig(m.Driver)))
	}
	return errors.Join(errs...)
}

// ReadDSN returns the DSN: dsn, or the content of dsn_file with
// surrounding white space trimmed.
func (m MetadataConfig) ReadDSN() (string, error) {
	if m.DSNFile == "" {
		return m.DSN, nil
	}
	f, err := os.Open(m.DSNFile)
	if err != nil {
		return "", fmt.Errorf("metadata.dsn_file: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxDSNFile+1))
	defer clear(b)
	if err != nil {
		return "", fmt.Errorf("metadata.dsn_file %s: %w", m.DSNFile, err)
	}
	if len(b) > maxDSNFile {
		return "", fmt.Errorf("metadata.dsn_file %s: larger than %d KiB", m.DSNFile, maxDSNFile>>10)
	}
	dsn := strings.TrimSpace(string(b))
	if dsn == "" {
		return "", fmt.Errorf("metadata.dsn_file %s: empty", m.DSNFile)
	}
	return dsn, nil
}

// printableConfig keeps a config value in a message short and readable.
func printableConfig(s string) string {
	s = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return '?'
		}
		return r
	}, s)
	if len(s) > 40 {
		s = s[:40] + "..."
	}
	return s
}
