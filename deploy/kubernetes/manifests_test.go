package kubernetes_test

// The manifests are data that nothing else compiles: these tests decode
// them into the real Kubernetes API types, so that a misspelt field fails
// here rather than being dropped by a lenient apply, and check that the
// Deployment provides every file, variable, port and flag the config and
// the serve command expect.

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pullsecret/pullsecret/proxy"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

const (
	kustomizationFile = "kustomization.yaml"
	exampleSuffix     = ".example.yaml"
	configKey         = "config.yaml"
	nameLabel         = "app.kubernetes.io/name"
	appName           = "pullsecret"
	// serveSource holds the usage text of `pullsecret serve`; it is read as
	// a file because package main cannot be imported and running the
	// command would make this test slow.
	serveSource = "../../cmd/pullsecret/serve.go"
)

// kinds are the objects the folder may hold, with the one apiVersion each
// is written in.
var kinds = map[string]struct {
	apiVersion string
	new        func() any
}{
	"ConfigMap":           {"v1", func() any { return new(corev1.ConfigMap) }},
	"Secret":              {"v1", func() any { return new(corev1.Secret) }},
	"Service":             {"v1", func() any { return new(corev1.Service) }},
	"Deployment":          {"apps/v1", func() any { return new(appsv1.Deployment) }},
	"PodDisruptionBudget": {"policy/v1", func() any { return new(policyv1.PodDisruptionBudget) }},
	"NetworkPolicy":       {"networking.k8s.io/v1", func() any { return new(networkingv1.NetworkPolicy) }},
}

// kustomization is the part of kustomize's Kustomization the folder uses;
// decoding it strictly means a new field is added here on purpose.
type kustomization struct {
	APIVersion string   `json:"apiVersion"`
	Kind       string   `json:"kind"`
	Resources  []string `json:"resources"`
}

// documents splits a YAML stream into its documents, leaving out empty and
// comment-only ones.
func documents(data []byte) ([][]byte, error) {
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	var docs [][]byte
	for {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			return docs, nil
		}
		if err != nil {
			return nil, err
		}
		var v any
		if err := yaml.Unmarshal(doc, &v); err != nil {
			return nil, err
		}
		if v != nil {
			docs = append(docs, doc)
		}
	}
}

// decodeStrict decodes one document into the API type its kind names:
// unknown and duplicate fields are errors.
func decodeStrict(doc []byte) (metav1.Object, string, error) {
	var tm metav1.TypeMeta
	if err := yaml.Unmarshal(doc, &tm); err != nil {
		return nil, "", err
	}
	k, ok := kinds[tm.Kind]
	if !ok {
		return nil, "", fmt.Errorf("kind %q: not one this folder may hold", tm.Kind)
	}
	if tm.APIVersion != k.apiVersion {
		return nil, "", fmt.Errorf("%s: apiVersion %q, want %q", tm.Kind, tm.APIVersion, k.apiVersion)
	}
	obj := k.new()
	if err := yaml.UnmarshalStrict(doc, obj); err != nil {
		return nil, "", fmt.Errorf("%s: %w", tm.Kind, err)
	}
	return obj.(metav1.Object), tm.Kind, nil
}

// manifests is every object of the folder, the examples included.
type manifests struct {
	kust        kustomization
	byKindName  map[string]metav1.Object // "Kind/name"
	docsPerFile map[string]int
	files       []string // every *.yaml but the kustomization
}

var loadManifests = sync.OnceValues(func() (*manifests, error) {
	m := &manifests{byKindName: map[string]metav1.Object{}, docsPerFile: map[string]int{}}
	b, err := os.ReadFile(kustomizationFile)
	if err != nil {
		return nil, err
	}
	if err := yaml.UnmarshalStrict(b, &m.kust); err != nil {
		return nil, fmt.Errorf("%s: %w", kustomizationFile, err)
	}
	files, err := filepath.Glob("*.yaml")
	if err != nil {
		return nil, err
	}
	for _, f := range files {
		if f == kustomizationFile {
			continue
		}
		m.files = append(m.files, f)
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, err
		}
		docs, err := documents(b)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", f, err)
		}
		m.docsPerFile[f] = len(docs)
		for i, doc := range docs {
			obj, kind, err := decodeStrict(doc)
			if err != nil {
				return nil, fmt.Errorf("%s, document %d: %w", f, i+1, err)
			}
			key := kind + "/" + obj.GetName()
			if _, dup := m.byKindName[key]; dup {
				return nil, fmt.Errorf("%s: %s defined twice", f, key)
			}
			m.byKindName[key] = obj
		}
	}
	return m, nil
})

func load(t *testing.T) *manifests {
	t.Helper()
	m, err := loadManifests()
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func get[T metav1.Object](t *testing.T, m *manifests, kind, name string) T {
	t.Helper()
	obj, ok := m.byKindName[kind+"/"+name]
	if !ok {
		t.Fatalf("no %s %q in the folder", kind, name)
	}
	return obj.(T)
}

func TestKustomizationListsEveryManifest(t *testing.T) {
	t.Parallel()
	m := load(t)
	if m.kust.APIVersion != "kustomize.config.k8s.io/v1beta1" || m.kust.Kind != "Kustomization" {
		t.Errorf("%s: apiVersion %q kind %q", kustomizationFile, m.kust.APIVersion, m.kust.Kind)
	}
	listed := map[string]bool{}
	for _, r := range m.kust.Resources {
		if listed[r] {
			t.Errorf("%s lists %s twice", kustomizationFile, r)
		}
		listed[r] = true
		if strings.HasSuffix(r, exampleSuffix) {
			t.Errorf("%s lists the example %s: its placeholders would replace real Secrets", kustomizationFile, r)
		}
		if _, err := os.Stat(r); err != nil {
			t.Errorf("%s lists %s: %v", kustomizationFile, r, err)
		}
	}
	for _, f := range m.files {
		if strings.HasSuffix(f, exampleSuffix) {
			continue
		}
		if !listed[f] {
			t.Errorf("%s is not listed in %s", f, kustomizationFile)
		}
		if n := m.docsPerFile[f]; n != 1 {
			t.Errorf("%s holds %d objects, want one", f, n)
		}
	}
}

func TestManifestsAreNamespaceAgnosticAndLabelled(t *testing.T) {
	t.Parallel()
	m := load(t)
	keys := slices.Sorted(func(yield func(string) bool) {
		for k := range m.byKindName {
			if !yield(k) {
				return
			}
		}
	})
	for _, k := range keys {
		obj := m.byKindName[k]
		t.Run(k, func(t *testing.T) {
			t.Parallel()
			if obj.GetNamespace() != "" {
				t.Errorf("namespace %q: the folder is applied into the namespace of the caller's choice", obj.GetNamespace())
			}
			if got := obj.GetLabels()[nameLabel]; got != appName {
				t.Errorf("label %s = %q, want %q", nameLabel, got, appName)
			}
		})
	}
}

// TestStrictDecodingRefusesTypos guards the guard: a lenient decoder would
// let every other test pass on manifests that Kubernetes reads differently.
func TestStrictDecodingRefusesTypos(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ name, doc string }{
		{"misspelt field", "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec: {replcas: 3}\n"},
		{"nested misspelt field", "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: [{port: 1, targetPrt: 2}]}\n"},
		{"duplicate field", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {a: b}\ndata: {c: d}\n"},
		{"wrong type", "apiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata: {name: x}\nspec: {selector: 2}\n"},
		{"wrong apiVersion", "apiVersion: extensions/v1beta1\nkind: Deployment\nmetadata: {name: x}\n"},
		{"unknown kind", "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if _, _, err := decodeStrict([]byte(tc.doc)); err == nil {
				t.Errorf("decoded without error:\n%s", tc.doc)
			}
		})
	}
}

// deployed is the Deployment with the config it mounts, loaded the way
// serve loads it.
type deployed struct {
	m         *manifests
	dep       *appsv1.Deployment
	container corev1.Container
	rawConfig string
	cfg       proxy.Config
}

func loadDeployed(t *testing.T) deployed {
	t.Helper()
	m := load(t)
	dep := get[*appsv1.Deployment](t, m, "Deployment", appName)
	if n := len(dep.Spec.Template.Spec.Containers); n != 1 {
		t.Fatalf("%d containers, want 1", n)
	}
	cm := get[*corev1.ConfigMap](t, m, "ConfigMap", "pullsecret-config")
	raw, ok := cm.Data[configKey]
	if !ok {
		t.Fatalf("ConfigMap pullsecret-config has no key %s", configKey)
	}
	p := filepath.Join(t.TempDir(), configKey)
	if err := os.WriteFile(p, []byte(raw), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := proxy.LoadConfig(p)
	if err != nil {
		t.Fatalf("proxy.LoadConfig: %v", err)
	}
	return deployed{m: m, dep: dep, container: dep.Spec.Template.Spec.Containers[0], rawConfig: raw, cfg: cfg}
}

// podEnv is what the container's environment defines, with the values the
// downward API would give a pod.
func (d deployed) podEnv() map[string]string {
	env := map[string]string{}
	for _, e := range d.container.Env {
		switch {
		case e.ValueFrom == nil:
			env[e.Name] = e.Value
		case e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "metadata.name":
			env[e.Name] = "pullsecret-5d8f7c9b4-x2k7q"
		case e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "status.podIP":
			env[e.Name] = "10.0.0.5"
		default:
			env[e.Name] = "value-of-" + e.Name
		}
	}
	return env
}

var kubeVarRE = regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`)

// expandArg does the kubelet's $(VAR) expansion of a container argument;
// it reports references the environment does not define, which the kubelet
// would leave in place unexpanded.
func expandArg(s string, env map[string]string) (string, []string) {
	var missing []string
	out := kubeVarRE.ReplaceAllStringFunc(s, func(m string) string {
		name := m[2 : len(m)-1]
		v, ok := env[name]
		if !ok {
			missing = append(missing, name)
			return m
		}
		return v
	})
	return out, missing
}

// flagValue is the value of --name in args ("--name V" or "--name=V").
func flagValue(args []string, name string) (string, bool) {
	for i, a := range args {
		if a == name && i+1 < len(args) {
			return args[i+1], true
		}
		if v, ok := strings.CutPrefix(a, name+"="); ok {
			return v, true
		}
	}
	return "", false
}

func TestConfigMapConfigLoads(t *testing.T) {
	t.Parallel()
	d := loadDeployed(t)
	cfg := d.cfg
	var raw struct {
		Cluster map[string]any `json:"cluster"`
	}
	if err := yaml.Unmarshal([]byte(d.rawConfig), &raw); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"advertise", "replica_id"} {
		if _, ok := raw.Cluster[k]; ok {
			t.Errorf("cluster.%s is in the config: every pod would claim the same one; it comes from a serve flag", k)
		}
	}
	if cfg.Metadata.Driver != proxy.MetadataPostgres || cfg.Cache.Driver != proxy.CacheDriverS3 || cfg.Cluster == nil {
		t.Errorf("metadata.driver %q, cache.driver %q, cluster %v: replicas need postgres, s3-aws and a cluster section",
			cfg.Metadata.Driver, cfg.Cache.Driver, cfg.Cluster != nil)
	}
	if cfg.Log.Format != "json" {
		t.Errorf("log.format %q, want json", cfg.Log.Format)
	}
	if cfg.ShutdownDelay <= 0 {
		t.Errorf("shutdown_delay %s: without it the listener may close while endpoints still send traffic", cfg.ShutdownDelay)
	}
	if cfg.Cluster == nil {
		return
	}

	// What serve does with its flags: the values come from the Deployment.
	env := d.podEnv()
	for flag, set := range map[string]*string{"--advertise": &cfg.Cluster.Advertise, "--replica-id": &cfg.Cluster.ReplicaID} {
		v, ok := flagValue(d.container.Args, flag)
		if !ok {
			t.Errorf("the container's args have no %s", flag)
			continue
		}
		*set, _ = expandArg(v, env)
	}
	if cfg.Cluster.Advertise != "http://10.0.0.5:5080" {
		t.Errorf("--advertise expands to %q, want http://10.0.0.5:5080", cfg.Cluster.Advertise)
	}
	if err := cfg.Validate(); err != nil {
		t.Errorf("Validate with the flags applied: %v", err)
	}
	if err := cfg.Cluster.CheckAdvertise(); err != nil {
		t.Error(err)
	}
	u, err := url.Parse(cfg.Cluster.Advertise)
	if err != nil {
		t.Fatal(err)
	}
	if _, port, _ := net.SplitHostPort(cfg.Listen); u.Port() != port {
		t.Errorf("--advertise port %q, but the server listens on %s", u.Port(), cfg.Listen)
	}
}

func TestDeploymentWiresTheConfig(t *testing.T) {
	t.Parallel()
	d := loadDeployed(t)
	pod := d.dep.Spec.Template.Spec
	c := d.container
	env := d.podEnv()
	mounts := volumeMounts(pod, c)
	podLabels := labels.Set(d.dep.Spec.Template.Labels)

	for _, tc := range []struct {
		name  string
		check func(t *testing.T)
	}{
		{"config mounted where --config reads it", func(t *testing.T) {
			if len(c.Args) == 0 || c.Args[0] != "serve" {
				t.Fatalf("args %q: want serve first", c.Args)
			}
			p, ok := flagValue(c.Args, "--config")
			if !ok {
				t.Fatal("no --config in args")
			}
			mt, ok := mounts.at(p)
			if !ok || mt.volume.ConfigMap == nil || mt.volume.ConfigMap.Name != "pullsecret-config" ||
				mt.mount.SubPath != configKey || mt.rel != "" {
				t.Errorf("--config %s is not the key %s of ConfigMap pullsecret-config mounted by subPath", p, configKey)
			}
		}},
		{"every file the config names is mounted", func(t *testing.T) {
			paths := configPaths(t, d.rawConfig)
			paths = append(paths, env["PULLSECRET_KEY_FILE"])
			secretKeys := secretKeys(get[*corev1.Secret](t, d.m, "Secret", appName))
			for _, p := range paths {
				mt, ok := mounts.at(p)
				if !ok {
					t.Errorf("%s: on no volume (the root file system is read-only and the image's content unknown)", p)
					continue
				}
				if mt.volume.Secret == nil {
					continue // writable folders are checked below
				}
				vs := mt.volume.Secret
				key := mt.rel
				if len(vs.Items) > 0 {
					i := slices.IndexFunc(vs.Items, func(it corev1.KeyToPath) bool { return it.Path == mt.rel })
					if i < 0 {
						t.Errorf("%s: no item of Secret %s is mounted at %s", p, vs.SecretName, mt.rel)
						continue
					}
					key = vs.Items[i].Key
				}
				if vs.SecretName != appName || !secretKeys[key] {
					t.Errorf("%s: key %q of Secret %s, which secret.example.yaml does not show", p, key, vs.SecretName)
				}
			}
		}},
		{"Secret mounted read-only, 0400, with every key it has", func(t *testing.T) {
			mt, ok := mounts.at(env["PULLSECRET_KEY_FILE"])
			if !ok || mt.volume.Secret == nil {
				t.Fatal("PULLSECRET_KEY_FILE is not on a Secret volume")
			}
			if !mt.mount.ReadOnly || mt.mount.SubPath != "" {
				t.Errorf("mount %s: readOnly %v subPath %q; want read-only, no subPath (a subPath never sees updates)",
					mt.mount.MountPath, mt.mount.ReadOnly, mt.mount.SubPath)
			}
			if m := mt.volume.Secret.DefaultMode; m == nil || *m != 0o400 {
				t.Errorf("defaultMode %v, want 0400", m)
			}
			var items []string
			for _, it := range mt.volume.Secret.Items {
				items = append(items, it.Key)
			}
			sort.Strings(items)
			want := slices.Sorted(func(yield func(string) bool) {
				for k := range secretKeys(get[*corev1.Secret](t, d.m, "Secret", appName)) {
					if !yield(k) {
						return
					}
				}
			})
			if !slices.Equal(items, want) {
				t.Errorf("items %q, secret.example.yaml has %q", items, want)
			}
		}},
		{"writable folders are emptyDirs", func(t *testing.T) {
			for name, p := range map[string]string{"PULLSECRET_HOME": env["PULLSECRET_HOME"], "cache.spool_dir": d.cfg.Cache.SpoolDir} {
				mt, ok := mounts.at(p)
				if p == "" || !ok || mt.volume.EmptyDir == nil || mt.mount.ReadOnly {
					t.Errorf("%s %q: not on a writable emptyDir", name, p)
				}
			}
		}},
		{"${VAR} of the config is in the container's environment", func(t *testing.T) {
			for _, name := range configEnvRefs(t, d.rawConfig) {
				if _, ok := env[name]; !ok {
					t.Errorf("the config reads ${%s}; the container does not set it", name)
				}
			}
			getenv := func(k string) string { return env[k] }
			if _, err := d.cfg.Cache.ResolveDriver(getenv); err != nil {
				t.Errorf("cache.parameters do not resolve in the container's environment: %v", err)
			}
		}},
		{"$(VAR) of the args is in the container's environment", func(t *testing.T) {
			for _, a := range c.Args {
				if _, missing := expandArg(a, env); len(missing) > 0 {
					t.Errorf("arg %q refers to %q, which the container does not define", a, missing)
				}
			}
		}},
		{"args are flags serve accepts", func(t *testing.T) {
			src, err := os.ReadFile(serveSource)
			if err != nil {
				t.Fatal(err)
			}
			_, rest, ok := strings.Cut(string(src), "const serveUsage = `")
			usage, _, ok2 := strings.Cut(rest, "`")
			if !ok || !ok2 {
				t.Fatalf("%s: no serveUsage constant", serveSource)
			}
			for _, a := range c.Args[1:] {
				if !strings.HasPrefix(a, "-") {
					continue
				}
				name, _, _ := strings.Cut(a, "=")
				re := regexp.MustCompile(`(^|[\s,\[])` + regexp.QuoteMeta(name) + `([\s=,\]]|$)`)
				if !re.MatchString(usage) {
					t.Errorf("%s: not a flag of pullsecret serve (%s)", name, serveSource)
				}
			}
		}},
		{"secretKeyRefs name keys of the example Secrets", func(t *testing.T) {
			for _, e := range c.Env {
				if e.ValueFrom == nil || e.ValueFrom.SecretKeyRef == nil {
					continue
				}
				ref := e.ValueFrom.SecretKeyRef
				s := get[*corev1.Secret](t, d.m, "Secret", ref.Name)
				if !secretKeys(s)[ref.Key] {
					t.Errorf("env %s: key %q is not in Secret %s of secret.example.yaml", e.Name, ref.Key, ref.Name)
				}
			}
		}},
		{"probes hit the listen port", func(t *testing.T) {
			_, listenPort, err := net.SplitHostPort(d.cfg.Listen)
			if err != nil {
				t.Fatal(err)
			}
			wantScheme := corev1.URISchemeHTTP
			if d.cfg.TLSCert != "" {
				wantScheme = corev1.URISchemeHTTPS
			}
			for _, p := range []struct {
				name  string
				probe *corev1.Probe
				path  string
			}{
				{"readinessProbe", c.ReadinessProbe, "/readyz"},
				{"livenessProbe", c.LivenessProbe, "/healthz"},
				{"startupProbe", c.StartupProbe, ""},
			} {
				if p.probe == nil || p.probe.HTTPGet == nil {
					t.Errorf("%s: want an httpGet probe", p.name)
					continue
				}
				g := p.probe.HTTPGet
				if p.path != "" && g.Path != p.path {
					t.Errorf("%s: path %q, want %s", p.name, g.Path, p.path)
				}
				if g.Path != "/healthz" && g.Path != "/readyz" {
					t.Errorf("%s: path %q is not a health endpoint", p.name, g.Path)
				}
				scheme := g.Scheme
				if scheme == "" {
					scheme = corev1.URISchemeHTTP
				}
				if scheme != wantScheme {
					t.Errorf("%s: scheme %s, the server speaks %s", p.name, scheme, wantScheme)
				}
				if port, ok := containerPort(c, g.Port); !ok || strconv.Itoa(int(port)) != listenPort {
					t.Errorf("%s: port %s is not the container port of listen %s", p.name, g.Port.String(), d.cfg.Listen)
				}
			}
			if rp := c.ReadinessProbe; rp != nil && rp.TimeoutSeconds <= 5 {
				t.Errorf("readinessProbe timeoutSeconds %d: /readyz may take its own 5s deadline to answer 503", rp.TimeoutSeconds)
			}
		}},
		{"grace period covers shutdown_delay + shutdown_timeout", func(t *testing.T) {
			g := pod.TerminationGracePeriodSeconds
			need := d.cfg.ShutdownDelay + d.cfg.ShutdownTimeout
			if g == nil {
				t.Fatalf("no terminationGracePeriodSeconds; it must exceed %s", need)
			}
			if time.Duration(*g)*time.Second <= need {
				t.Errorf("terminationGracePeriodSeconds %d, must exceed %s", *g, need)
			}
		}},
		{"hardened", func(t *testing.T) {
			psc, sc := pod.SecurityContext, c.SecurityContext
			if psc == nil || sc == nil {
				t.Fatal("securityContext missing")
			}
			nonRoot := (psc.RunAsNonRoot != nil && *psc.RunAsNonRoot) || (sc.RunAsNonRoot != nil && *sc.RunAsNonRoot)
			seccomp := (psc.SeccompProfile != nil && psc.SeccompProfile.Type == corev1.SeccompProfileTypeRuntimeDefault) ||
				(sc.SeccompProfile != nil && sc.SeccompProfile.Type == corev1.SeccompProfileTypeRuntimeDefault)
			switch {
			case !nonRoot:
				t.Error("runAsNonRoot is not set")
			case !seccomp:
				t.Error("seccompProfile is not RuntimeDefault")
			case sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem:
				t.Error("readOnlyRootFilesystem is not set")
			case sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation:
				t.Error("allowPrivilegeEscalation is not false")
			case sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || len(sc.Capabilities.Add) > 0:
				t.Error("capabilities: want drop [ALL] and nothing added")
			}
			if pod.AutomountServiceAccountToken == nil || *pod.AutomountServiceAccountToken {
				t.Error("automountServiceAccountToken: the server never uses the API; want false")
			}
		}},
		{"resources", func(t *testing.T) {
			r := c.Resources
			for _, name := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
				if _, ok := r.Requests[name]; !ok {
					t.Errorf("no %s request", name)
				}
			}
			lim, ok := r.Limits[corev1.ResourceMemory]
			if !ok || lim.Cmp(resource.MustParse("512Mi")) < 0 || lim.Cmp(resource.MustParse("1Gi")) > 0 {
				t.Errorf("memory limit %s: want 512Mi..1Gi (the proxy stays under 512 MiB of heap)", lim.String())
			}
		}},
		{"replicas spread and rolled without losing one", func(t *testing.T) {
			if r := d.dep.Spec.Replicas; r == nil || *r != 3 {
				t.Errorf("replicas %v, want 3", r)
			}
			ru := d.dep.Spec.Strategy.RollingUpdate
			if d.dep.Spec.Strategy.Type != appsv1.RollingUpdateDeploymentStrategyType || ru == nil ||
				ru.MaxUnavailable == nil || *ru.MaxUnavailable != intstr.FromInt32(0) ||
				ru.MaxSurge == nil || *ru.MaxSurge != intstr.FromInt32(1) {
				t.Errorf("strategy %+v: want RollingUpdate, maxUnavailable 0, maxSurge 1", d.dep.Spec.Strategy)
			}
			spread := slices.ContainsFunc(pod.TopologySpreadConstraints, func(c corev1.TopologySpreadConstraint) bool {
				return c.TopologyKey == "kubernetes.io/hostname" && c.WhenUnsatisfiable == corev1.DoNotSchedule
			})
			anti := pod.Affinity != nil && pod.Affinity.PodAntiAffinity != nil
			if !spread && !anti {
				t.Error("neither a hostname topologySpreadConstraint nor podAntiAffinity: replicas may share a node")
			}
			for _, tsc := range pod.TopologySpreadConstraints {
				if !selects(t, tsc.LabelSelector, podLabels) {
					t.Errorf("topologySpreadConstraint %s: its selector misses the pods", tsc.TopologyKey)
				}
			}
		}},
		{"Service, PDB and NetworkPolicy select the pods", func(t *testing.T) {
			if !selects(t, d.dep.Spec.Selector, podLabels) {
				t.Error("the Deployment's selector misses its own pods")
			}
			svc := get[*corev1.Service](t, d.m, "Service", appName)
			if svc.Spec.Type != corev1.ServiceTypeClusterIP && svc.Spec.Type != "" {
				t.Errorf("Service type %s, want ClusterIP", svc.Spec.Type)
			}
			if !selects(t, &metav1.LabelSelector{MatchLabels: svc.Spec.Selector}, podLabels) || len(svc.Spec.Selector) == 0 {
				t.Error("the Service's selector misses the pods")
			}
			_, listenPort, _ := net.SplitHostPort(d.cfg.Listen)
			if len(svc.Spec.Ports) != 1 || strconv.Itoa(int(svc.Spec.Ports[0].Port)) != "5080" {
				t.Errorf("Service ports %+v: want one, 5080", svc.Spec.Ports)
			} else if p, ok := containerPort(c, svc.Spec.Ports[0].TargetPort); !ok || strconv.Itoa(int(p)) != listenPort {
				t.Errorf("Service targetPort %s is not the listen port %s", svc.Spec.Ports[0].TargetPort.String(), listenPort)
			}
			pdb := get[*policyv1.PodDisruptionBudget](t, d.m, "PodDisruptionBudget", appName)
			if !selects(t, pdb.Spec.Selector, podLabels) {
				t.Error("the PodDisruptionBudget's selector misses the pods")
			}
			if ma := pdb.Spec.MinAvailable; ma == nil || *ma != intstr.FromInt32(2) {
				t.Errorf("PodDisruptionBudget minAvailable %v, want 2", ma)
			}
			np := get[*networkingv1.NetworkPolicy](t, d.m, "NetworkPolicy", appName)
			if !selects(t, &np.Spec.PodSelector, podLabels) {
				t.Error("the NetworkPolicy's podSelector misses the pods")
			}
			allowed := slices.ContainsFunc(np.Spec.Ingress, func(r networkingv1.NetworkPolicyIngressRule) bool {
				return len(r.Ports) == 0 || slices.ContainsFunc(r.Ports, func(p networkingv1.NetworkPolicyPort) bool {
					if p.Port == nil {
						return true
					}
					cp, ok := containerPort(c, *p.Port)
					return ok && strconv.Itoa(int(cp)) == listenPort
				})
			})
			if !allowed {
				t.Errorf("the NetworkPolicy admits no traffic to port %s", listenPort)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			tc.check(t)
		})
	}
}

// mountsOf finds the volume behind a path in the container.
type mountsOf struct {
	mounts  []corev1.VolumeMount
	volumes map[string]corev1.Volume
}

type mountAt struct {
	mount  corev1.VolumeMount
	volume corev1.Volume
	rel    string // the path inside the volume ("" for the mount point)
}

func volumeMounts(pod corev1.PodSpec, c corev1.Container) mountsOf {
	m := mountsOf{mounts: c.VolumeMounts, volumes: map[string]corev1.Volume{}}
	for _, v := range pod.Volumes {
		m.volumes[v.Name] = v
	}
	return m
}

// at is the deepest mount holding p.
func (m mountsOf) at(p string) (mountAt, bool) {
	p = path.Clean(p)
	var best mountAt
	found := false
	for _, vm := range m.mounts {
		mp := path.Clean(vm.MountPath)
		rel, ok := strings.CutPrefix(p, mp)
		if !ok || (rel != "" && !strings.HasPrefix(rel, "/")) {
			continue
		}
		if found && len(mp) <= len(path.Clean(best.mount.MountPath)) {
			continue
		}
		v, ok := m.volumes[vm.Name]
		if !ok {
			continue
		}
		best, found = mountAt{mount: vm, volume: v, rel: strings.TrimPrefix(rel, "/")}, true
	}
	return best, found
}

// containerPort resolves a port by number or by name.
func containerPort(c corev1.Container, p intstr.IntOrString) (int32, bool) {
	for _, cp := range c.Ports {
		if (p.Type == intstr.Int && cp.ContainerPort == p.IntVal) || (p.Type == intstr.String && cp.Name == p.StrVal) {
			return cp.ContainerPort, true
		}
	}
	return 0, false
}

// selects reports whether sel, which must not be empty, matches l.
func selects(t *testing.T, sel *metav1.LabelSelector, l labels.Set) bool {
	t.Helper()
	if sel == nil {
		return false
	}
	s, err := metav1.LabelSelectorAsSelector(sel)
	if err != nil {
		t.Errorf("selector %v: %v", sel, err)
		return false
	}
	return !s.Empty() && s.Matches(l)
}

// secretKeys are the keys a Secret manifest defines.
func secretKeys(s *corev1.Secret) map[string]bool {
	keys := map[string]bool{}
	for k := range s.Data {
		keys[k] = true
	}
	for k := range s.StringData {
		keys[k] = true
	}
	return keys
}

// configValues calls fn with every string value of the config.
func configValues(t *testing.T, raw string, fn func(key, v string)) {
	t.Helper()
	var v any
	if err := yaml.Unmarshal([]byte(raw), &v); err != nil {
		t.Fatal(err)
	}
	var walk func(key string, v any)
	walk = func(key string, v any) {
		switch v := v.(type) {
		case map[string]any:
			for k, e := range v {
				walk(strings.TrimPrefix(key+"."+k, "."), e)
			}
		case []any:
			for i, e := range v {
				walk(fmt.Sprintf("%s[%d]", key, i), e)
			}
		case string:
			fn(key, v)
		}
	}
	walk("", v)
}

// configPaths are the absolute paths the config names.
func configPaths(t *testing.T, raw string) []string {
	var out []string
	configValues(t, raw, func(_, v string) {
		if strings.HasPrefix(v, "/") {
			out = append(out, v)
		}
	})
	sort.Strings(out)
	return out
}

var configEnvRE = regexp.MustCompile(`\$\{([^}]*)\}`)

// configEnvRefs are the NAMEs of the ${NAME} references in the config.
func configEnvRefs(t *testing.T, raw string) []string {
	var out []string
	configValues(t, raw, func(_, v string) {
		for _, m := range configEnvRE.FindAllStringSubmatch(v, -1) {
			out = append(out, m[1])
		}
	})
	sort.Strings(out)
	return out
}
