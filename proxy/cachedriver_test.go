package proxy

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

const canaryS3Secret = "CANARY-s3-secret-7f3a91"

func TestCacheDriverConfig(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		yaml    string
		driver  string
		wantErr string // "" = valid
	}{
		{"default", "", CacheDriverFilesystem, ""},
		{"filesystem root", "cache: {driver: filesystem, root: /var/cache/ps}", CacheDriverFilesystem, ""},
		{"filesystem rootdirectory", "cache: {driver: filesystem, parameters: {rootdirectory: /c}}", CacheDriverFilesystem, ""},
		{"inmemory", "cache: {driver: inmemory}", CacheDriverInmemory, ""},
		{"s3", "cache: {driver: s3-aws, parameters: {bucket: b, region: eu-west-1, accesskey: AK, secretkey: '${S3_SECRET}'}}", CacheDriverS3, ""},
		{"s3 alias s3aws, endpoint, no keys", "cache: {driver: S3AWS, parameters: {bucket: b, regionendpoint: 'http://minio:9000', forcepathstyle: true, chunksize: 5242880}}", CacheDriverS3, ""},
		{"s3 alias s3, secret file", "cache: {driver: s3, parameters: {bucket: b, region: r, accesskey: AK, secretkey_file: /run/secrets/s3}}", CacheDriverS3, ""},
		{"unknown driver", "cache: {driver: gcs}", "", `cache.driver: "gcs" (want filesystem, s3-aws or inmemory)`},
		{"unknown parameter", "cache: {driver: s3-aws, parameters: {bucket: b, region: r, buckett: c}}", "", "cache.parameters.buckett: unknown parameter of the s3-aws driver"},
		{"no bucket", "cache: {driver: s3-aws, parameters: {region: r}}", "", "the s3-aws driver needs a bucket"},
		{"no region", "cache: {driver: s3-aws, parameters: {bucket: b}}", "", "needs a region"},
		{"half the keys", "cache: {driver: s3-aws, parameters: {bucket: b, region: r, secretkey: x}}", "", "give accesskey and secretkey together"},
		{"secret twice", "cache: {driver: s3-aws, parameters: {bucket: b, region: r, accesskey: a, secretkey: x, secretkey_file: f}}", "", "give secretkey or secretkey_file, not both"},
		{"session token", "cache: {driver: s3-aws, parameters: {bucket: b, region: r, sessiontoken: t}}", "", "cache.parameters.sessiontoken: not supported"},
		{"sdk log", "cache: {driver: s3-aws, parameters: {bucket: b, region: r, loglevel: debug}}", "", "cache.parameters.loglevel: not supported"},
		{"nested value", "cache: {driver: s3-aws, parameters: {bucket: {a: b}, region: r}}", "", "cache.parameters.bucket: want a string, number or boolean"},
		{"_file of a non-secret", "cache: {driver: s3-aws, parameters: {bucket_file: f, region: r}}", "", "cache.parameters.bucket_file: unknown parameter"},
		{"root with s3", "cache: {driver: s3-aws, root: /x, parameters: {bucket: b, region: r}}", "", "cache.root: only for the filesystem driver"},
		{"root twice", "cache: {root: /x, parameters: {rootdirectory: /y}}", "", "give root or parameters.rootdirectory, not both"},
		{"inmemory takes none", "cache: {driver: inmemory, parameters: {rootdirectory: /y}}", "", "unknown parameter of the inmemory driver (none)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			cfg, err := ParseConfig([]byte(tt.yaml))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if cfg.Cache.Driver != tt.driver {
				t.Fatalf("driver %q, want %q", cfg.Cache.Driver, tt.driver)
			}
		})
	}
}

// Errors about parameters never quote a value: a secret put in the wrong
// key stays out of the message.
func TestCacheDriverErrorsQuoteNoValue(t *testing.T) {
	t.Parallel()
	for _, y := range []string{
		"cache: {driver: s3-aws, parameters: {bucket: b, region: r, sessiontoken: " + canaryS3Secret + "}}",
		"cache: {driver: s3-aws, parameters: {bucket: b, region: r, " + "secretkey: " + canaryS3Secret + "}}",
		"cache: {driver: s3-aws, parameters: {bucket: b, region: r, loglevel: " + canaryS3Secret + "}}",
		"cache: {driver: inmemory, parameters: {secretkey: " + canaryS3Secret + "}}",
	} {
		_, err := ParseConfig([]byte(y))
		if err == nil {
			t.Fatalf("%s: accepted", y)
		}
		if strings.Contains(err.Error(), canaryS3Secret) {
			t.Fatalf("error quotes the secret: %v", err)
		}
	}
}

func TestResolveCacheDriver(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	secretFile := filepath.Join(dir, "s3-secret")
	if err := os.WriteFile(secretFile, []byte("  "+canaryS3Secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	env := map[string]string{"S3_SECRET": canaryS3Secret, "S3_BUCKET": "cache", "SECRETS": dir}
	getenv := func(k string) string { return env[k] }
	resolve := func(y string) (*CacheDriver, error) {
		t.Helper()
		cfg, err := ParseConfig([]byte(y))
		if err != nil {
			t.Fatal(err)
		}
		return cfg.Cache.ResolveDriver(getenv)
	}

	d, err := resolve(`cache: {driver: s3-aws, parameters: {bucket: "${S3_BUCKET}-1", region: us-east-1, forcepathstyle: true, chunksize: 5242880, accesskey: AK, secretkey: "${S3_SECRET}"}}`)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]any{"bucket": "cache-1", "region": "us-east-1", "forcepathstyle": true, "chunksize": 5242880,
		"accesskey": "AK", "secretkey": canaryS3Secret}
	if d.Factory != "s3aws" || !reflect.DeepEqual(d.Parameters, want) {
		t.Fatalf("resolved %s %v", d.Factory, d.Parameters)
	}
	if got := d.Describe(); got != "s3-aws bucket=cache-1 region=us-east-1" {
		t.Fatalf("Describe = %q", got)
	}
	msg := "invalid region provided: " + canaryS3Secret
	if got := d.RedactError(errors.New(msg)).Error(); got != "invalid region provided: [redacted]" {
		t.Fatalf("RedactError = %q", got)
	}

	// A secret file (its name from the environment), trimmed.
	d, err = resolve(`cache: {driver: s3-aws, parameters: {bucket: b, region: r, accesskey: AK, secretkey_file: "${SECRETS}/s3-secret"}}`)
	if err != nil {
		t.Fatal(err)
	}
	if d.Parameters["secretkey"] != canaryS3Secret || d.Parameters["secretkey_file"] != nil {
		t.Fatalf("secret file: %v", d.Parameters)
	}

	// A '$' without '{' is the secret's own.
	d, err = resolve(`cache: {driver: s3-aws, parameters: {bucket: b, region: r, accesskey: AK, secretkey: "a$b$$c"}}`)
	if err != nil || d.Parameters["secretkey"] != "a$b$$c" {
		t.Fatalf("literal $: %v %v", d, err)
	}

	for y, wantErr := range map[string]string{
		`cache: {driver: s3-aws, parameters: {bucket: b, region: r, accesskey: AK, secretkey: "${NOPE}"}}`:                  "cache.parameters.secretkey: environment variable NOPE is not set",
		`cache: {driver: s3-aws, parameters: {bucket: b, region: r, accesskey: AK, secretkey: "${not a name}"}}`:            "${not a name}: not a variable name",
		`cache: {driver: s3-aws, parameters: {bucket: b, region: r, accesskey: AK, secretkey_file: "` + dir + `/missing"}}`: "cache.parameters.secretkey_file: open " + dir + "/missing: no such file",
		`cache: {driver: s3-aws, parameters: {bucket: b, region: r, accesskey: AK, secretkey_file: "` + dir + `"}}`:         "cache.parameters.secretkey_file",
	} {
		_, err := resolve(y)
		if err == nil || !strings.Contains(err.Error(), wantErr) {
			t.Errorf("%s: err = %v, want %q", y, err, wantErr)
		}
		if err != nil && strings.Contains(err.Error(), canaryS3Secret) {
			t.Errorf("error quotes the secret: %v", err)
		}
	}
}
