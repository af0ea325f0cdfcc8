/*
 * TEST DOUBLE — NOT NVIDIA's libnvidia-ml.so.
 *
 * A stub NVML library for the worker-agent tests. The tests compile it with
 * `gcc -shared -fPIC` and load it through nvml-wrapper's `Nvml::builder().lib_path(..)`
 * (the agent's `--nvml-lib`), so the agent's real nvml-wrapper code path runs without a GPU.
 *
 * By default it pretends to be two GPUs whose values are modelled on a real H100 80GB HBM3
 * (shared/gpu/h100/probe-idle.txt and probe-load.txt): even indexes idle, odd ones under load.
 * Like that H100, fan speed answers NVML_ERROR_INVALID_ARGUMENT (no fans) and retired pages
 * NVML_ERROR_NOT_SUPPORTED (Hopper remaps rows), so the agent must report them absent.
 *
 * It says it is a stub: nvmlSystemGetDriverVersion answers "580.159.04-stub" (the agent marks
 * such GPUs `simulated`).
 *
 * Inventory, from the environment, read once by nvmlInit:
 *   WEFT_NVML_STUB_GPUS        GPU count, 0..8 (default 2; above 8 counts as 8).
 *   WEFT_NVML_STUB_MODEL       nvmlDeviceGetName of every GPU (default "NVIDIA H100 80GB HBM3").
 *   WEFT_NVML_STUB_MEMORY_MIB  total memory of every GPU, MiB (default 81559, the H100's
 *                              85520809984 bytes); used/free/reserved scale with it.
 *   WEFT_NVML_STUB_UUID_SEED   UUIDs derived from the seed and the index: the same seed gives the
 *                              same UUIDs (a cloned GPU on two "machines"), different seeds
 *                              differ. Default: GPU 0 and 1 have the fixed UUIDs below
 *                              (GPU-977652fe-..., GPU-5a3c1e2b-...), GPUs 2..7
 *                              GPU-5a3c1e2b-7d44-4c1d-9f00-0000000000bN.
 *
 * Faults, through files in the directory named by $WEFT_NVML_STUB_DIR. <i> is the NVML index
 * (0-based, the `index` of `/v1/status` gpus[]), so each fault hits exactly ONE GPU:
 *   xid-<i>            contains an XID code: delivered once as a CRITICAL_XID event for GPU i
 *                      by nvmlEventSetWait_v2, then the file is deleted.
 *   lost-<i>           while it exists, every query on GPU i answers NVML_ERROR_GPU_IS_LOST.
 *   driver-not-loaded  while it exists, nvmlInit answers NVML_ERROR_DRIVER_NOT_LOADED.
 *
 * nvml-wrapper resolves every NVML symbol lazily (each is a Result; a missing one fails only
 * when called), so the stub exports nvmlInit_v2 / nvmlShutdown (called on drop) plus exactly
 * the functions the agent calls.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int nvmlReturn_t;
#define OK 0
#define ERR_INVALID_ARGUMENT 2
#define ERR_NOT_SUPPORTED 3
#define ERR_NOT_FOUND 6
#define ERR_INSUFFICIENT_SIZE 7
#define ERR_DRIVER_NOT_LOADED 9
#define ERR_TIMEOUT 10
#define ERR_GPU_IS_LOST 15

#define MAX_GPUS 8

typedef struct {
    int index;
    char name[96], uuid[96], bus_id[32];
    unsigned long long mem_total, mem_used, mem_free, mem_reserved;
    unsigned util_gpu, util_mem, temp, power_mw, limit_mw, sm_mhz, mem_mhz;
    unsigned long long energy_mj, throttle;
    unsigned proc_pid;
    unsigned long long proc_mem;
} fake_dev;

/* The two H100 profiles: idle (even indexes) and under load (odd). */
static const fake_dev profiles[2] = {
    {0, "", "", "", 85520809984ULL, 0ULL, 85017493504ULL, 503316480ULL, 0, 0, 48, 111862, 700000, 375, 2619,
     2342641ULL, 0x1ULL /* GPU_IDLE */, 0, 0},
    {1, "", "", "", 85520809984ULL, 1194131456ULL, 83823362048ULL, 503316480ULL, 100, 32, 67, 698337, 700000, 1320, 2619,
     5872489ULL, 0x4ULL /* SW_POWER_CAP */, 436, 1184890880ULL},
};
static const char *default_uuids[2] = {
    "GPU-977652fe-01d3-44cc-d3b3-996721563657",
    "GPU-5a3c1e2b-7d44-4c1d-9f00-0000000000b1",
};

static fake_dev devs[MAX_GPUS];
static unsigned n_gpus;

/* FNV-1a 64 of `s`, then of the index byte: deterministic per (seed, index). */
static unsigned long long fnv(const char *s, unsigned salt) {
    unsigned long long h = 0xcbf29ce484222325ULL;
    for (; *s; s++) { h ^= (unsigned char)*s; h *= 0x100000001b3ULL; }
    h ^= salt; h *= 0x100000001b3ULL;
    return h;
}

static void init_devs(void) {
    const char *n = getenv("WEFT_NVML_STUB_GPUS");
    int c = n ? atoi(n) : 2;
    n_gpus = c < 0 ? 0 : (c > MAX_GPUS ? MAX_GPUS : (unsigned)c);
    const char *model = getenv("WEFT_NVML_STUB_MODEL");
    const char *mib = getenv("WEFT_NVML_STUB_MEMORY_MIB");
    const char *seed = getenv("WEFT_NVML_STUB_UUID_SEED");
    unsigned long long total = mib ? strtoull(mib, NULL, 10) * 1048576ULL : 0;
    for (unsigned i = 0; i < MAX_GPUS; i++) {
        fake_dev *d = &devs[i];
        *d = profiles[i % 2];
        d->index = (int)i;
        snprintf(d->name, sizeof d->name, "%s", model && *model ? model : "NVIDIA H100 80GB HBM3");
        snprintf(d->bus_id, sizeof d->bus_id, "00000000:00:%02X.0", 6 + i);
        if (total) {
            unsigned long long reserved = total / 170; /* the H100's share, ~0.6% */
            unsigned long long used = d->mem_used < total - reserved ? d->mem_used : 0;
            d->mem_total = total; d->mem_reserved = reserved; d->mem_used = used;
            d->mem_free = total - reserved - used;
            if (d->proc_mem > used) d->proc_mem = used;
        }
        if (seed && *seed) {
            unsigned long long a = fnv(seed, 2 * i), b = fnv(seed, 2 * i + 1);
            snprintf(d->uuid, sizeof d->uuid, "GPU-%08llx-%04llx-%04llx-%04llx-%012llx",
                     a >> 32, (a >> 16) & 0xffff, a & 0xffff, b >> 48, b & 0xffffffffffffULL);
        } else if (i < 2) {
            snprintf(d->uuid, sizeof d->uuid, "%s", default_uuids[i]);
        } else {
            snprintf(d->uuid, sizeof d->uuid, "GPU-5a3c1e2b-7d44-4c1d-9f00-0000000000b%u", i);
        }
    }
}

typedef struct { unsigned version; unsigned long long total, reserved, free, used; } mem_v2;
typedef struct { unsigned gpu, memory; } util_t;
typedef struct { char legacy[16]; unsigned domain, bus, device, dev_id, subsys_id; char bus_id[32]; } pci_t;
typedef struct { unsigned pid; unsigned long long used; unsigned gi, ci; } proc_t;
typedef struct { fake_dev *device; unsigned long long type, data; unsigned gi, ci; } event_t;

static int stub_file(const char *name, char *buf, size_t len) {
    const char *dir = getenv("WEFT_NVML_STUB_DIR");
    if (!dir) return 0;
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    if (buf && len) { size_t n = fread(buf, 1, len - 1, f); buf[n] = 0; }
    fclose(f);
    if (buf) unlink(path); /* consumed */
    return 1;
}

static unsigned gpu_count(void) { return n_gpus; }

static int lost(fake_dev *d) {
    char name[32];
    snprintf(name, sizeof name, "lost-%d", d->index);
    return stub_file(name, NULL, 0);
}

#define DEV(d) fake_dev *dv = (fake_dev *)(d); if (!dv) return ERR_INVALID_ARGUMENT; if (lost(dv)) return ERR_GPU_IS_LOST;

nvmlReturn_t nvmlInit_v2(void) {
    if (stub_file("driver-not-loaded", NULL, 0)) return ERR_DRIVER_NOT_LOADED;
    init_devs();
    return OK;
}
nvmlReturn_t nvmlInit(void) { return nvmlInit_v2(); }
nvmlReturn_t nvmlInitWithFlags(unsigned flags) { (void)flags; return nvmlInit_v2(); }
nvmlReturn_t nvmlShutdown(void) { return OK; }
const char *nvmlErrorString(nvmlReturn_t r) { (void)r; return "stub NVML error"; }

nvmlReturn_t nvmlSystemGetDriverVersion(char *v, unsigned len) { snprintf(v, len, "580.159.04-stub"); return OK; }
nvmlReturn_t nvmlSystemGetNVMLVersion(char *v, unsigned len) { snprintf(v, len, "13.580.159.04"); return OK; }
nvmlReturn_t nvmlDeviceGetCount_v2(unsigned *c) { *c = gpu_count(); return OK; }
nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned i, fake_dev **d) {
    if (i >= gpu_count()) return ERR_INVALID_ARGUMENT;
    *d = &devs[i];
    return OK;
}
nvmlReturn_t nvmlDeviceGetUUID(fake_dev *d, char *b, unsigned len) { if (!d) return ERR_INVALID_ARGUMENT; snprintf(b, len, "%s", d->uuid); return OK; }
nvmlReturn_t nvmlDeviceGetName(fake_dev *d, char *b, unsigned len) { DEV(d) snprintf(b, len, "%s", dv->name); return OK; }
nvmlReturn_t nvmlDeviceGetPciInfo_v3(fake_dev *d, pci_t *p) {
    DEV(d) memset(p, 0, sizeof *p);
    snprintf(p->bus_id, sizeof p->bus_id, "%s", dv->bus_id);
    snprintf(p->legacy, sizeof p->legacy, "%s", dv->bus_id + 4);
    p->bus = 0; p->device = 6 + dv->index; p->dev_id = 590352606; p->subsys_id = 381751518;
    return OK;
}
nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(fake_dev *d, mem_v2 *m) {
    DEV(d) m->total = dv->mem_total; m->used = dv->mem_used; m->free = dv->mem_free; m->reserved = dv->mem_reserved;
    return OK;
}
nvmlReturn_t nvmlDeviceGetUtilizationRates(fake_dev *d, util_t *u) { DEV(d) u->gpu = dv->util_gpu; u->memory = dv->util_mem; return OK; }
nvmlReturn_t nvmlDeviceGetTemperature(fake_dev *d, int sensor, unsigned *t) { DEV(d) if (sensor != 0) return ERR_INVALID_ARGUMENT; *t = dv->temp; return OK; }
nvmlReturn_t nvmlDeviceGetPowerUsage(fake_dev *d, unsigned *p) { DEV(d) *p = dv->power_mw; return OK; }
nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(fake_dev *d, unsigned *p) { DEV(d) *p = dv->limit_mw; return OK; }
nvmlReturn_t nvmlDeviceGetPowerManagementLimit(fake_dev *d, unsigned *p) { DEV(d) *p = dv->limit_mw; return OK; }
nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(fake_dev *d, unsigned long long *e) {
    DEV(d) dv->energy_mj += dv->power_mw; /* ~1 s of draw per read: a counter that rises */
    *e = dv->energy_mj;
    return OK;
}
nvmlReturn_t nvmlDeviceGetClockInfo(fake_dev *d, int type, unsigned *c) {
    DEV(d) if (type == 0 || type == 1) *c = dv->sm_mhz; else if (type == 2) *c = dv->mem_mhz; else return ERR_INVALID_ARGUMENT;
    return OK;
}
nvmlReturn_t nvmlDeviceGetFanSpeed_v2(fake_dev *d, unsigned fan, unsigned *s) { DEV(d) (void)fan; (void)s; return ERR_INVALID_ARGUMENT; }
nvmlReturn_t nvmlDeviceGetFanSpeed(fake_dev *d, unsigned *s) { DEV(d) (void)s; return ERR_INVALID_ARGUMENT; }
nvmlReturn_t nvmlDeviceGetRetiredPages_v2(fake_dev *d, int cause, unsigned *n, unsigned long long *a, unsigned long long *t) {
    DEV(d) (void)cause; (void)n; (void)a; (void)t; return ERR_NOT_SUPPORTED;
}
nvmlReturn_t nvmlDeviceGetRetiredPages(fake_dev *d, int cause, unsigned *n, unsigned long long *a) {
    DEV(d) (void)cause; (void)n; (void)a; return ERR_NOT_SUPPORTED;
}
nvmlReturn_t nvmlDeviceGetCurrentClocksThrottleReasons(fake_dev *d, unsigned long long *r) { DEV(d) *r = dv->throttle; return OK; }
nvmlReturn_t nvmlDeviceGetCurrentClocksEventReasons(fake_dev *d, unsigned long long *r) { DEV(d) *r = dv->throttle; return OK; }
nvmlReturn_t nvmlDeviceGetTotalEccErrors(fake_dev *d, int type, int counter, unsigned long long *c) { DEV(d) (void)type; (void)counter; *c = 0; return OK; }
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(fake_dev *d, unsigned *count, proc_t *infos) {
    DEV(d) unsigned n = dv->proc_pid ? 1 : 0;
    if (!infos || *count < n) { *count = n; return n ? ERR_INSUFFICIENT_SIZE : OK; }
    *count = n;
    if (n) { infos[0].pid = dv->proc_pid; infos[0].used = dv->proc_mem; infos[0].gi = 0xFFFFFFFF; infos[0].ci = 0xFFFFFFFF; }
    return OK;
}

/* Events: one static set; XIDs come from xid-<i> files. */
static int the_set;
nvmlReturn_t nvmlEventSetCreate(void **set) { *set = &the_set; return OK; }
nvmlReturn_t nvmlEventSetFree(void *set) { (void)set; return OK; }
nvmlReturn_t nvmlDeviceRegisterEvents(fake_dev *d, unsigned long long types, void *set) {
    DEV(d) (void)set; return (types & 0x8ULL) ? OK : ERR_NOT_SUPPORTED;
}
nvmlReturn_t nvmlDeviceGetSupportedEventTypes(fake_dev *d, unsigned long long *t) { DEV(d) *t = 0x8ULL | 0x2ULL | 0x4ULL; return OK; }
nvmlReturn_t nvmlEventSetWait_v2(void *set, event_t *data, unsigned timeout_ms) {
    (void)set;
    unsigned waited = 0;
    for (;;) {
        for (unsigned i = 0; i < gpu_count(); i++) {
            char name[32], buf[32];
            snprintf(name, sizeof name, "xid-%u", i);
            if (stub_file(name, buf, sizeof buf)) {
                memset(data, 0, sizeof *data);
                data->device = &devs[i];
                data->type = 0x8ULL; /* nvmlEventTypeXidCriticalError */
                data->data = strtoull(buf, NULL, 10);
                return OK;
            }
        }
        if (waited >= timeout_ms) return ERR_TIMEOUT;
        unsigned step = timeout_ms - waited < 20 ? timeout_ms - waited : 20;
        usleep(step * 1000);
        waited += step;
    }
}
