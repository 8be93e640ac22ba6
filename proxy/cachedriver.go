package proxy

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
)

// The cache's storage driver: distribution's drivers, chosen and
// parameterised by name as distribution's own configuration does
// (cache.driver, cache.parameters). The server opens them with
// storage/driver/factory; this file only checks the configuration and
// resolves what it refers to (environment variables, secret files).

// Cache driver names, as cache.driver accepts them (canonical forms).
const (
	CacheDriverFilesystem = "filesystem"
	CacheDriverS3         = "s3-aws"
	CacheDriverInmemory   = "inmemory"
)

// paramFileSuffix marks a parameter whose value is read from a file.
const paramFileSuffix = "_file"

// cacheDriverSpec is what the configuration accepts for one driver.
type cacheDriverSpec struct {
	factory string          // name registered with storage/driver/factory
	keys    map[string]bool // parameters passed through
	secrets map[string]bool // parameters that are secrets (may come from <key>_file)
	refused map[string]string
}

// cacheDriverSpecOf returns the spec of a canonical driver name.
func cacheDriverSpecOf(name string) cacheDriverSpec {
	switch name {
	case CacheDriverFilesystem:
		return cacheDriverSpec{
			factory: "filesystem",
			keys:    keySet("rootdirectory"),
		}
	case CacheDriverInmemory:
		return cacheDriverSpec{factory: "inmemory", keys: keySet()}
	}
	// CacheDriverS3: distribution v3's s3-aws driver (FromParameters).
	return cacheDriverSpec{
		factory: "s3aws",
		keys: keySet("bucket", "region", "regionendpoint", "forcepathstyle", "accesskey", "secretkey",
			"encrypt", "keyid", "secure", "skipverify", "v4auth", "chunksize", "multipartcopychunksize",
			"multipartcopymaxconcurrency", "multipartcopythresholdsize", "rootdirectory", "storageclass",
			"useragent", "objectacl", "usedualstack", "accelerate", "usefipsendpoint"),
		secrets: keySet("accesskey", "secretkey"),
		refused: map[string]string{
			"sessiontoken": "distribution's s3-aws driver ignores it; leave accesskey and secretkey out and " +
				"set AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN in the environment",
			"loglevel":         "the AWS SDK would print requests, signatures included, to stdout past the server's log",
			"redirectendpoint": "the cache serves content itself and never redirects clients to the bucket",
		},
	}
}

func keySet(keys ...string) map[string]bool {
	m := make(map[string]bool, len(keys))
	for _, k := range keys {
		m[k] = true
	}
	return m
}

// canonicalCacheDriver maps the accepted spellings of a driver name
// (distribution registers s3-aws as "s3aws" and "s3") to one.
func canonicalCacheDriver(name string) (string, bool) {
	switch strings.ToLower(strings.TrimSpace(name)) {
	case "", "filesystem":
		return CacheDriverFilesystem, true
	case "s3-aws", "s3aws", "s3":
		return CacheDriverS3, true
	case "inmemory":
		return CacheDriverInmemory, true
	}
	return "", false
}

// validateDriver checks cache.driver and cache.parameters, and puts the
// driver's name in its canonical form. Values are not resolved here
// (environment, files): that is ResolveDriver's job, when the cache opens.
// No error quotes a parameter's value.
func (cc *CacheConfig) validateDriver() error {
	name, ok := canonicalCacheDriver(cc.Driver)
	if !ok {
		return fmt.Errorf("cache.driver: %q (want filesystem, s3-aws or inmemory)", cc.Driver)
	}
	cc.Driver = name
	spec := cacheDriverSpecOf(name)
	var errs []error
	bad := func(format string, a ...any) { errs = append(errs, fmt.Errorf(format, a...)) }
	for _, k := range sortedParamKeys(cc.Parameters) {
		v := cc.Parameters[k]
		base, fromFile := strings.CutSuffix(k, paramFileSuffix)
		switch {
		case spec.refused[k] != "":
			bad("cache.parameters.%s: not supported: %s", k, spec.refused[k])
			continue
		case fromFile && spec.secrets[base]:
			if _, both := cc.Parameters[base]; both {
				bad("cache.parameters: give %s or %s, not both", base, k)
			}
			if s, ok := v.(string); !ok || s == "" {
				bad("cache.parameters.%s: want a file name", k)
			}
			continue
		case !spec.keys[k]:
			bad("cache.parameters.%s: unknown parameter of the %s driver (%s)", k, name, strings.Join(knownParameters(spec), ", "))
			continue
		}
		switch v.(type) {
		case string, bool, int, int64, uint64, float64:
		default:
			bad("cache.parameters.%s: want a string, number or boolean", k)
		}
	}
	if name == CacheDriverS3 {
		if !cc.has("bucket") {
			bad("cache.parameters.bucket: the s3-aws driver needs a bucket")
		}
		if !cc.has("region") && !cc.has("regionendpoint") {
			bad("cache.parameters.region: the s3-aws driver needs a region (or a regionendpoint)")
		}
		if cc.has("accesskey") != cc.has("secretkey") {
			bad("cache.parameters: give accesskey and secretkey together, or neither " +
				"(then the AWS SDK finds credentials: AWS_* environment variables, shared config, instance role)")
		}
	}
	if name == CacheDriverFilesystem && cc.Root != "" && cc.has("rootdirectory") {
		bad("cache: give root or parameters.rootdirectory, not both")
	}
	if name != CacheDriverFilesystem && cc.Root != "" {
		bad("cache.root: only for the filesystem driver")
	}
	return errors.Join(errs...)
}

// has reports whether parameter k, or its _file form, is set.
func (cc *CacheConfig) has(k string) bool {
	_, a := cc.Parameters[k]
	_, b := cc.Parameters[k+paramFileSuffix]
	return a || b
}

func knownParameters(spec cacheDriverSpec) []string {
	var out []string
	for k := range spec.keys {
		out = append(out, k)
		if spec.secrets[k] {
			out = append(out, k+paramFileSuffix)
		}
	}
	sort.Strings(out)
	if len(out) == 0 {
		return []string{"none"}
	}
	return out
}

func sortedParamKeys(m map[string]any) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// CacheDriver is the cache's storage driver with its parameters resolved:
// what the server passes to storage/driver/factory.Create.
type CacheDriver struct {
	// Name is the driver's canonical name (CacheDriverS3, ...).
	Name string
	// Factory is its name in distribution's driver factory ("s3aws").
	Factory string
	// Parameters are the resolved parameters. They hold secrets: never
	// log them.
	Parameters map[string]any
	secrets    []string
}

// ResolveDriver resolves cache.parameters for opening the driver: ${NAME}
// in a string value is replaced by the environment variable NAME (unset or
// empty is an error), and a secret parameter's <key>_file form is replaced
// by <key> with the file's content (surrounding white space trimmed).
// Errors name parameters, variables and files, never a value.
func (cc *CacheConfig) ResolveDriver(getenv func(string) string) (*CacheDriver, error) {
	if err := cc.validateDriver(); err != nil {
		return nil, err
	}
	spec := cacheDriverSpecOf(cc.Driver)
	d := &CacheDriver{Name: cc.Driver, Factory: spec.factory, Parameters: map[string]any{}}
	for _, k := range sortedParamKeys(cc.Parameters) {
		v := cc.Parameters[k]
		s, isString := v.(string)
		if !isString {
			d.Parameters[k] = v
			continue
		}
		s, err := expandEnv(s, getenv)
		if err != nil {
			return nil, fmt.Errorf("cache.parameters.%s: %w", k, err)
		}
		if base, ok := strings.CutSuffix(k, paramFileSuffix); ok && spec.secrets[base] {
			if s, err = readSecretFile(s); err != nil {
				return nil, fmt.Errorf("cache.parameters.%s: %w", k, err)
			}
			k = base
		}
		if spec.secrets[k] {
			d.secrets = append(d.secrets, s)
		}
		d.Parameters[k] = s
	}
	return d, nil
}

// Redact replaces the driver's secret values in s: for messages built from
// the driver's errors, which may quote parameters.
func (d *CacheDriver) Redact(s string) string {
	for _, v := range d.secrets {
		if v != "" {
			s = strings.ReplaceAll(s, v, "[redacted]")
		}
	}
	return s
}

// RedactError is err with Redact applied to its message (the chain is not
// kept: it could format the secret again).
func (d *CacheDriver) RedactError(err error) error {
	if err == nil {
		return nil
	}
	return errors.New(d.Redact(err.Error()))
}

// Describe is a loggable summary of the driver: its name and the
// parameters that locate the store, never a secret.
func (d *CacheDriver) Describe() string {
	var parts []string
	for _, k := range []string{"bucket", "region", "regionendpoint", "rootdirectory"} {
		if v, ok := d.Parameters[k]; ok {
			parts = append(parts, fmt.Sprintf("%s=%v", k, v))
		}
	}
	if len(parts) == 0 {
		return d.Name
	}
	return d.Redact(d.Name + " " + strings.Join(parts, " "))
}

var envRefRE = regexp.MustCompile(`\$\{([^}]*)\}`)
var envNameRE = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// expandEnv replaces each ${NAME} in s by the variable's value. A '$' not
// followed by '{' is kept: secrets may contain one.
func expandEnv(s string, getenv func(string) string) (string, error) {
	var err error
	out := envRefRE.ReplaceAllStringFunc(s, func(m string) string {
		name := m[2 : len(m)-1]
		if !envNameRE.MatchString(name) {
			if err == nil {
				err = fmt.Errorf("${%s}: not a variable name", name)
			}
			return m
		}
		v := getenv(name)
		if v == "" && err == nil {
			err = fmt.Errorf("environment variable %s is not set", name)
		}
		return v
	})
	return out, err
}

// maxSecretFile bounds a secret file: a key, not a document.
const maxSecretFile = 64 << 10

func readSecretFile(name string) (string, error) {
	f, err := os.Open(filepath.Clean(name))
	if err != nil {
		// The *PathError names the file and the reason; no content.
		return "", err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxSecretFile+1))
	if err != nil {
		return "", fmt.Errorf("read %s: %w", name, err)
	}
	if len(b) > maxSecretFile {
		return "", fmt.Errorf("%s: larger than %d KiB", name, maxSecretFile>>10)
	}
	s := strings.TrimSpace(string(b))
	if s == "" {
		return "", fmt.Errorf("%s is empty", name)
	}
	return s, nil
}
