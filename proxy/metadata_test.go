package proxy

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestMetadataConfig(t *testing.T) {
	t.Parallel()
	const pw = "canary-meta-pw-0e7c"
	dsn := "postgres://ps:" + pw + "@db.example:5432/pullsecret?sslmode=verify-full"
	dsnFile := filepath.Join(t.TempDir(), "dsn")
	if err := os.WriteFile(dsnFile, []byte("\n  "+dsn+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, yaml string
		driver     string // want, when no error
		err        string
	}{
		{"default", ``, MetadataFile, ""},
		{"file", "metadata: {driver: file}", MetadataFile, ""},
		{"postgres dsn", "metadata: {driver: postgres, dsn: '" + dsn + "'}", MetadataPostgres, ""},
		{"postgresql dsn_file", "metadata: {driver: PostgreSQL, dsn_file: " + dsnFile + "}", MetadataPostgres, ""},
		{"postgres without dsn", "metadata: {driver: postgres}", "", "needs dsn or dsn_file"},
		{"both", "metadata: {driver: postgres, dsn: '" + dsn + "', dsn_file: " + dsnFile + "}", "", "needs dsn or dsn_file (one of them)"},
		{"dsn for file", "metadata: {dsn: '" + dsn + "'}", "", "are for driver postgres"},
		{"unknown driver", "metadata: {driver: mysql}", "", `metadata.driver: "mysql"`},
		{"audit path", "metadata: {driver: postgres, dsn_file: x}\naudit: {path: /var/log/a.jsonl}", "", "audit.path"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			cfg, err := ParseConfig([]byte(tc.yaml))
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want %q", err, tc.err)
				}
				if strings.Contains(err.Error(), pw) {
					t.Fatalf("error holds the password: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if cfg.Metadata.Driver != tc.driver {
				t.Fatalf("driver %q, want %q", cfg.Metadata.Driver, tc.driver)
			}
			if cfg.Metadata.Driver == MetadataPostgres {
				got, err := cfg.Metadata.ReadDSN()
				if err != nil || got != dsn {
					t.Fatalf("ReadDSN = %q, %v", got, err)
				}
			}
			for _, s := range []string{fmt.Sprint(cfg), fmt.Sprintf("%+v", cfg), fmt.Sprintf("%#v", cfg)} {
				if strings.Contains(s, pw) {
					t.Fatalf("the printed config holds the password: %s", s)
				}
			}
		})
	}
	empty := filepath.Join(t.TempDir(), "empty")
	os.WriteFile(empty, []byte(" \n"), 0o600)
	if _, err := (MetadataConfig{Driver: MetadataPostgres, DSNFile: empty}).ReadDSN(); err == nil || !strings.Contains(err.Error(), "empty") {
		t.Fatalf("empty dsn_file: %v", err)
	}
	if _, err := (MetadataConfig{Driver: MetadataPostgres, DSNFile: filepath.Join(t.TempDir(), "none")}).ReadDSN(); err == nil {
		t.Fatal("missing dsn_file: no error")
	}
}
